"""The Helm chart starts each service the way the service itself is configured: every template,
rendered for the chart's default values (and for optional values set), gives containers whose

  * `--flags` all exist in the target service's generated parser (`tensortrace <service> --help`),
  * arguments are accepted by that parser and by the service's validation (every problem listed),
  * containerPorts are the ports that configuration listens on, by name (`http`, `control`, `query`),
  * liveness/readiness probes hit /healthz and /readyz on the service's HTTP port, and the
    Prometheus annotation names that port,

and the chart's default ports are the services' own defaults.

No helm binary here (a later issue): `HelmLite` below renders the subset of Go templates and Sprig
the chart uses, and fails on anything else. Like Helm, it reads numbers from values.yaml as
float64 and prints them as Go's %v does (1048576 -> "1.048576e+06"), so a template that forgets
`int` fails here as it would crash-loop the pod.
"""

from __future__ import annotations

import copy
import decimal
import os
import re

import pytest
import yaml

from tensortrace import cli

CHART = os.path.join(os.path.dirname(__file__), "..", "..", "charts", "tensortrace")
pytestmark = pytest.mark.unit


# -- a small Helm ---------------------------------------------------------------------------------

def go_format(v) -> str:
    """A value as Go's text/template prints it (fmt %v)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return ""  # Helm replaces "<no value>" with ""
    if isinstance(v, float):
        return _go_float(v)
    if isinstance(v, list):
        return "[" + " ".join(go_format(x) for x in v) + "]"
    return str(v)


def _go_float(x: float) -> str:
    """strconv.FormatFloat(x, 'g', -1, 64): shortest digits; %e when the exponent is < -4 or >= 6."""
    if x == 0:
        return "0"
    sign, digits, exp = decimal.Decimal(repr(x)).as_tuple()
    digits = list(digits)
    while len(digits) > 1 and digits[-1] == 0:
        digits.pop()
        exp += 1
    nd, dp = len(digits), len(digits) + exp
    s = "-" if sign else ""
    e = dp - 1
    ds = "".join(map(str, digits))
    if e < -4 or e >= 6:
        mant = ds[0] + ("." + ds[1:] if nd > 1 else "")
        return f"{s}{mant}e{'+' if e >= 0 else '-'}{abs(e):02d}"
    if dp <= 0:
        return f"{s}0.{'0' * -dp}{ds}"
    if dp >= nd:
        return s + ds + "0" * (dp - nd)
    return f"{s}{ds[:dp]}.{ds[dp:]}"


def _as_helm_values(v):
    """values.yaml as Helm sees it: YAML -> JSON -> Go, so every number is a float64."""
    if isinstance(v, dict):
        return {k: _as_helm_values(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_as_helm_values(x) for x in v]
    if isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    return v


def _truthy(v) -> bool:
    return not (v is None or v is False or v == 0 or v == "" or v == [] or v == {})


def _plain(v):
    """For toYaml: whole floats back to ints (sigs.k8s.io/yaml writes 1, not 1.0)."""
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, float) and v == int(v):
        return int(v)
    return v


_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)
_ARG = re.compile(r'"(?:[^"\\]|\\.)*"|\S+')


class HelmLite:
    def __init__(self, values: dict, release: str = "tt"):
        with open(os.path.join(CHART, "Chart.yaml")) as f:
            chart = yaml.safe_load(f)
        self.root = {"Values": _as_helm_values(values),
                     "Release": {"Name": release, "Namespace": "default", "Service": "Helm"},
                     "Chart": {"Name": chart["name"], "Version": chart["version"], "AppVersion": chart["appVersion"]}}
        self.defines: dict[str, list] = {}
        self.funcs = {
            "include": lambda name, ctx: self._render(self.defines[name], ctx),
            "printf": self._printf,
            "trunc": lambda n, s: s[:int(n)],
            "trimSuffix": lambda suf, s: s[:-len(suf)] if suf and s.endswith(suf) else s,
            "quote": lambda v: '"' + go_format(v).replace("\\", "\\\\").replace('"', '\\"') + '"',
            "toYaml": lambda v: yaml.safe_dump(_plain(v), default_flow_style=False, sort_keys=True).rstrip("\n"),
            "nindent": lambda n, s: "\n" + "\n".join(" " * int(n) + line for line in s.split("\n")),
            "indent": lambda n, s: "\n".join(" " * int(n) + line for line in s.split("\n")),
            "join": lambda sep, items: sep.join(go_format(x) for x in items),
            "int": lambda v: int(float(v)) if not isinstance(v, str) else int(v or 0),
            "default": lambda d, v=None: v if _truthy(v) else d,
        }

    def render_file(self, path: str) -> str:
        with open(path) as f:
            nodes = self._parse(self._tokens(f.read()))
        return self._render(nodes, self.root)

    def load_helpers(self) -> None:
        for name in os.listdir(os.path.join(CHART, "templates")):
            if name.endswith(".tpl"):
                self.render_file(os.path.join(CHART, "templates", name))

    # template text -> tokens -> tree
    @staticmethod
    def _tokens(text: str) -> list[tuple[str, str]]:
        out, pos, trim_next = [], 0, False
        for m in _ACTION.finditer(text):
            lit = text[pos:m.start()]
            if trim_next:
                lit = lit.lstrip()
            if m.group(1):
                lit = lit.rstrip()
            out.append(("text", lit))
            out.append(("action", m.group(2)))
            pos, trim_next = m.end(), bool(m.group(3))
        lit = text[pos:]
        out.append(("text", lit.lstrip() if trim_next else lit))
        return out

    def _parse(self, tokens, i: int = 0, top: bool = True):
        nodes = []
        while i < len(tokens):
            kind, val = tokens[i]
            i += 1
            if kind == "text":
                nodes.append(("text", val))
                continue
            word = val.split(None, 1)[0] if val else ""
            if val.startswith("/*"):
                continue
            if word in ("if", "with"):
                body, i, term = self._parse(tokens, i, top=False)
                other = []
                if term == "else":
                    other, i, term = self._parse(tokens, i, top=False)
                assert term == "end", f"unterminated {{{{ {val} }}}}"
                nodes.append((word, val[len(word):].strip(), body, other))
            elif word == "define":
                body, i, term = self._parse(tokens, i, top=False)
                self.defines[val.split(None, 1)[1].strip().strip('"')] = body
            elif word in ("end", "else"):
                assert not top, f"stray {{{{ {val} }}}}"
                return nodes, i, word
            elif word in ("range", "block", "template", "tpl") or "(" in val:
                raise NotImplementedError(f"HelmLite does not render {{{{ {val} }}}}: extend it (or use helm)")
            else:
                nodes.append(("expr", val))
        return (nodes if top else (nodes, i, None))

    # tree -> text
    def _render(self, nodes, dot) -> str:
        out = []
        for node in nodes:
            kind = node[0]
            if kind == "text":
                out.append(node[1])
            elif kind == "expr":
                out.append(go_format(self._pipeline(node[1], dot)))
            else:
                v = self._pipeline(node[1], dot)
                if _truthy(v):
                    out.append(self._render(node[2], v if kind == "with" else dot))
                else:
                    out.append(self._render(node[3], dot))
        return "".join(out)

    def _pipeline(self, expr: str, dot):
        value, first = None, True
        for cmd in expr.split("|"):
            args = _ARG.findall(cmd.strip())
            if args[0] in self.funcs:
                params = [self._operand(a, dot) for a in args[1:]] + ([] if first else [value])
                value = self.funcs[args[0]](*params)
            else:
                assert first and len(args) == 1, f"cannot evaluate {expr!r}"
                value = self._operand(args[0], dot)
            first = False
        return value

    def _operand(self, tok: str, dot):
        if tok.startswith('"'):
            return tok[1:-1].encode().decode("unicode_escape")
        if re.fullmatch(r"-?\d+", tok):
            return int(tok)
        if tok == ".":
            return dot
        if tok.startswith((".", "$")):
            node = self.root if tok.startswith("$") else dot
            for key in [k for k in tok.lstrip("$").split(".") if k]:
                node = node.get(key) if isinstance(node, dict) else None
            return node
        raise NotImplementedError(f"HelmLite: unknown function or operand {tok!r}")

    @staticmethod
    def _printf(fmt: str, *args):
        it = iter(args)
        return re.sub(r"%[sdvq]", lambda m: go_format(next(it)), fmt)


def _values(**overrides) -> dict:
    with open(os.path.join(CHART, "values.yaml")) as f:
        values = yaml.safe_load(f)
    for path, v in overrides.items():
        node = values
        *parents, last = path.split("__")
        for k in parents:
            node = node[k]
        node[last] = v
    return values


def render_chart(values: dict) -> list[dict]:
    """Every Kubernetes object the chart renders for `values`."""
    helm = HelmLite(copy.deepcopy(values))
    helm.load_helpers()
    docs = []
    for name in sorted(os.listdir(os.path.join(CHART, "templates"))):
        if name.endswith((".yaml", ".yml")):
            text = helm.render_file(os.path.join(CHART, "templates", name))
            docs += [d for d in yaml.safe_load_all(text) if d]
        elif name == "NOTES.txt":
            helm.render_file(os.path.join(CHART, "templates", name))
    return docs


def _containers(docs):
    for d in docs:
        if d["kind"] in ("DaemonSet", "Deployment", "StatefulSet"):
            for c in d["spec"]["template"]["spec"]["containers"]:
                yield d, c


# -- the checks -----------------------------------------------------------------------------------

VALUE_SETS = {
    "defaults": _values(),
    "optional values set": _values(ringGroupId=2000, exporter__ringOwnerUids=[1000, 1001],
                                   exporter__batchSizeBytes=1048000, loader__queryPort=50099,
                                   loader__clickhouseDsn="chdb:///var/lib/tensortrace/ch"),
}


def test_helmlite_renders_numbers_as_helm_does():
    assert [_go_float(x) for x in (1048576.0, 50052.0, 9464.0, 1e6, 0.5, 123456.0, 4194304.0, 0.0001, 1e-05)] == \
        ["1.048576e+06", "50052", "9464", "1e+06", "0.5", "123456", "4.194304e+06", "0.0001", "1e-05"]
    helm = HelmLite({"n": 1048576, "p": 50052})
    assert helm._render(helm._parse(helm._tokens("{{ .Values.n }} {{ int .Values.n }} {{ .Values.p | quote }}")),
                        helm.root) == '1.048576e+06 1048576 "50052"'


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_every_container_flag_exists_and_every_value_is_accepted(values):
    docs = render_chart(values)
    seen = set()
    for workload, c in _containers(docs):
        args = c["args"]
        spec = cli.service_spec(args[0])
        seen.add(spec.name)
        parser, _flags = spec.parser()
        known = set(parser._option_string_actions)
        unknown = [a for a in args[1:] if a.startswith("-") and a.split("=", 1)[0] not in known]
        assert not unknown, f"{workload['kind']} {c['name']}: flags `tensortrace {spec.name}` does not have: {unknown}"
        args = [a.replace("$(NODE_NAME)", "node-a") for a in args]
        cfg, runtime = spec.parse(args[1:])   # a ConfigError here lists every problem
        if spec.name == "exporter":
            assert cfg.node == "node-a" and cfg.kafka.bootstrap_servers == values["kafka"]["bootstrapServers"]
            assert cfg.batch_size == values["exporter"]["batchSizeBytes"]
            assert cfg.ring_group == (values["ringGroupId"] or None)
            assert cfg.ring_owner_uids == tuple(values["exporter"]["ringOwnerUids"])
        if spec.name == "loader":
            assert (cfg.query_host, cfg.query_port) == ("0.0.0.0", values["loader"]["queryPort"])
            assert (cfg.topic, cfg.dlq_topic) == (values["kafka"]["topic"], values["kafka"]["deadLetterTopic"])
            assert (cfg.ttl_days, cfg.payload_codec) == (values["loader"]["ttlDays"], values["loader"]["payloadCodec"])
    assert seen == {"exporter", "loader"}


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_ports_and_probes_are_the_ports_the_service_listens_on(values):
    docs = render_chart(values)
    container_ports = {}
    for workload, c in _containers(docs):
        spec = cli.service_spec(c["args"][0])
        cfg, runtime = spec.parse([a.replace("$(NODE_NAME)", "node-a") for a in c["args"][1:]])
        listens = {"http": runtime.http_port, **cfg.listen_ports()}
        declared = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        where = f"{workload['kind']} {c['name']}"
        assert declared == {k: v for k, v in listens.items() if v >= 0}, \
            f"{where}: containerPorts {declared} but the service listens on {listens}"
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = c[probe]["httpGet"]
            port = declared.get(get["port"], get["port"])
            assert (get["path"], port) == (path, runtime.http_port), f"{where}: {probe} {get}"
        annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
        assert annotations.get("prometheus.io/port") == str(runtime.http_port), f"{where}: Prometheus port"
        container_ports[workload["metadata"]["labels"]["app.kubernetes.io/component"]] = declared
    for svc in (d for d in docs if d["kind"] == "Service"):
        component = svc["spec"]["selector"]["app.kubernetes.io/component"]
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in container_ports[component], f"Service {svc['metadata']['name']}: {p}"
            assert p["port"] == container_ports[component][p["targetPort"]]


def test_the_chart_defaults_are_the_services_defaults():
    from tensortrace.compose import LOADER
    from tensortrace.exporter.config import ExporterConfig
    from tensortrace.exporter.main import SERVICE as EXPORTER
    from tensortrace.query.config import DEFAULT_QUERY_PORT, QueryServerConfig

    values = _values()
    assert values["exporter"]["controlPort"] == ExporterConfig().control_port
    assert values["exporter"]["metricsPort"] == EXPORTER.http_port
    assert values["loader"]["metricsPort"] == LOADER.http_port
    assert values["loader"]["queryPort"] == DEFAULT_QUERY_PORT == QueryServerConfig().query_port
    assert values["kafka"]["topic"] == ExporterConfig().topic == LOADER.config_cls().topic
    assert values["kafka"]["deadLetterTopic"] == LOADER.config_cls().dlq_topic


def test_a_template_that_forgets_int_is_caught(tmp_path):
    """What the checks above would say if a numeric flag were interpolated as Helm renders it."""
    spec = cli.service_spec("exporter")
    helm = HelmLite(_values())
    arg = helm._render(helm._parse(helm._tokens("--batch-size={{ .Values.exporter.batchSizeBytes }}")), helm.root)
    assert arg == "--batch-size=1.048576e+06"
    with pytest.raises(SystemExit):
        spec.parse([arg])
