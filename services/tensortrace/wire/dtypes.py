"""The v1 DType table: wire code -> (torch dtype name, element size). The one place it is written.

Dependency-free (only the generated protobuf module), so the ring slab splitter and the codec share it.
"""

from __future__ import annotations

from tensortrace.v1 import records_pb2 as pb

DTYPES: dict[int, tuple[str, int]] = {
    pb.FLOAT32: ("float32", 4),
    pb.FLOAT16: ("float16", 2),
    pb.BFLOAT16: ("bfloat16", 2),
    pb.FLOAT64: ("float64", 8),
    pb.INT8: ("int8", 1),
    pb.UINT8: ("uint8", 1),
    pb.INT16: ("int16", 2),
    pb.INT32: ("int32", 4),
    pb.INT64: ("int64", 8),
    pb.BOOL: ("bool", 1),
    pb.FLOAT8_E4M3FN: ("float8_e4m3fn", 1),
    pb.FLOAT8_E5M2: ("float8_e5m2", 1),
    pb.FLOAT8_E4M3FNUZ: ("float8_e4m3fnuz", 1),
    pb.FLOAT8_E5M2FNUZ: ("float8_e5m2fnuz", 1),
    pb.FLOAT8_E8M0FNU: ("float8_e8m0fnu", 1),
}
ELEMENT_SIZE: dict[int, int] = {code: size for code, (_, size) in DTYPES.items()}
BY_NAME: dict[str, int] = {name: code for code, (name, _) in DTYPES.items()}
