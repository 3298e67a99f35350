"""The pipeline's processes started locally, for the demo, tests and benchmarks (one copy of each launcher).

Modules are imported on their own, so the SGLang venv (which lacks grpc/kafka) can use the server
launcher and the tiny model maker:

    from tensortrace.devstack.processes import ExporterProcess, LoaderProcess   # project venv
    from tensortrace.devstack.sglang_server import SGLangServer                 # any venv
    from tensortrace.devstack.tiny_model import make_tiny_model                 # needs torch + transformers
"""
