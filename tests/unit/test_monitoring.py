"""Monitoring (issue #15): the Prometheus alerting rules in deploy/prometheus/
and the Grafana dashboard deploy/grafana/failoverd.json.

promtool checks the rule files and runs their unit tests (promtool's own test
files, synthetic series); promtool missing is a failure, not a skip. Every
metric the rules and the dashboard name must be one that GET /metrics
serves: the metric names and label values come from the real metrics_text()
of a leader's and a standby's status, so renaming a metric or a label value
in failoverd/api/views.py breaks this test, not the alerts in production.

The repository has no YAML library; the rule and test files are read with
`load_yaml` below, a reader for the block subset of YAML they are written in,
and the number of rules it finds is checked against promtool's count."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from failoverd.api.views import metrics_text
from failoverd.config.load import parse_config
from failoverd.core import events as ev
from failoverd.core.state import PgObservation, PgRole, Position, Role, StateStamp
from failoverd.core.status import FailoverRecord, MemberStatus
from failoverd.runtime.supervisor import SupervisorCounters

ROOT = Path(__file__).resolve().parents[2]
RULES_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "failoverd.json"
CONFIG = ROOT / "configs" / "three-nodes-quorum.toml"
JOB = 'job="failoverd"'  # the scrape job the rules assume (deploy/README.md, "Monitoring")
SEVERITIES = {"critical", "warning"}
# Writes down or at risk: these page (the list, plus the unfenced server).
CRITICAL = {
    "FailoverdNoPrimary",
    "FailoverdTwoPrimaries",
    "FailoverdQuorumDegraded",
    "FailoverdUnfencedPostgresPrimary",
}
# Labels Prometheus or the scrape configuration add, not failoverd.
TARGET_LABELS = {"job", "instance", "cluster"}
# Dashboard variables and Grafana's own.
GRAFANA_VARIABLES = {"__rate_interval", "__interval", "__range"}


# ------------------------------------------------------------ YAML subset


class _Lines:
    """Significant lines (indent, text) of a YAML document; blank and
    comment-only lines dropped except inside block scalars."""

    def __init__(self, text: str) -> None:
        self.raw = text.split("\n")
        self.i = 0

    def _skip(self) -> None:
        while self.i < len(self.raw) and (not self.raw[self.i].strip() or self.raw[self.i].lstrip().startswith("#")):
            self.i += 1

    def peek(self) -> tuple[int, str] | None:
        self._skip()
        if self.i >= len(self.raw):
            return None
        line = self.raw[self.i]
        return len(line) - len(line.lstrip(" ")), line.strip()


def _strip_comment(text: str) -> str:
    quote = None
    escaped = False
    for n, c in enumerate(text):
        if escaped:
            escaped = False
        elif quote:
            if c == "\\" and quote == '"':
                escaped = True
            elif c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c == "#" and (n == 0 or text[n - 1] == " "):
            return text[:n].rstrip()
    return text


def _scalar(text: str) -> Any:
    text = _strip_comment(text).strip()
    if text == "[]":
        return []
    if text == "{}":
        return {}
    if text.startswith('"'):
        return json.loads(text)
    if text.startswith("'"):
        assert text.endswith("'"), text
        return text[1:-1].replace("''", "'")
    assert not text.startswith(("[", "{", "&", "*", "!", "|", ">")), f"unsupported YAML: {text}"
    return text


def _block_scalar(lines: _Lines, style: str, parent_indent: int) -> str:
    body: list[str] = []
    indent = None
    while lines.i < len(lines.raw):
        line = lines.raw[lines.i]
        if line.strip():
            here = len(line) - len(line.lstrip(" "))
            if here <= parent_indent:
                break
            indent = here if indent is None else indent
            body.append(line[indent:])
        else:
            body.append("")
        lines.i += 1
    while body and not body[-1]:
        body.pop()
    if style[0] == "|":
        text = "\n".join(body)
    else:  # folded: single line breaks become spaces, blank lines newlines
        text = ""
        for line in body:
            text += "\n" if not line else (" " if text and not text.endswith("\n") else "") + line
    return text if style.endswith("-") else text + "\n"


def _mapping_entry(lines: _Lines, indent: int, text: str, out: dict[str, Any]) -> None:
    key, sep, rest = text.partition(":")
    assert sep and (not rest or rest[0] == " "), f"not a mapping entry: {text}"
    key, rest = key.strip(), _strip_comment(rest).strip()
    assert key not in out, f"duplicate key {key}"
    if rest in ("|", "|-", ">", ">-"):
        out[key] = _block_scalar(lines, rest, indent)
    elif rest:
        out[key] = _scalar(rest)
    else:
        nxt = lines.peek()
        if nxt is not None and (nxt[0] > indent or (nxt[0] == indent and nxt[1].startswith("- "))):
            out[key] = _node(lines, nxt[0])
        else:
            out[key] = None


def _node(lines: _Lines, indent: int) -> Any:
    first = lines.peek()
    assert first is not None and first[0] == indent
    if first[1] == "-" or first[1].startswith("- "):
        items: list[Any] = []
        while (line := lines.peek()) is not None and line[0] == indent and line[1].startswith("-"):
            rest = line[1][1:].strip()
            lines.i += 1
            if not rest:
                nxt = lines.peek()
                items.append(None if nxt is None or nxt[0] <= indent else _node(lines, nxt[0]))
            elif re.match(r"[A-Za-z_][\w.-]*:( |$)", rest):
                item: dict[str, Any] = {}
                _mapping_entry(lines, indent + 2, rest, item)
                while (more := lines.peek()) is not None and more[0] == indent + 2 and not more[1].startswith("- "):
                    lines.i += 1
                    _mapping_entry(lines, indent + 2, more[1], item)
                items.append(item)
            else:
                items.append(_scalar(rest))
        return items
    mapping: dict[str, Any] = {}
    while (line := lines.peek()) is not None and line[0] == indent and not line[1].startswith("- "):
        lines.i += 1
        _mapping_entry(lines, indent, line[1], mapping)
    return mapping


def load_yaml(text: str) -> Any:
    lines = _Lines(text)
    first = lines.peek()
    assert first is not None and first[0] == 0, "empty document"
    document = _node(lines, 0)
    assert lines.peek() is None, f"unparsed line {lines.i + 1}: {lines.raw[lines.i]!r}"
    return document


def test_yaml_subset_reader() -> None:
    text = """\
# comment
a: 1
b: 'x ''y'' #not a comment'   # a comment
c:
  - d: |
      line one
        indented
    e: >-
      folded
      text
  - plain # comment
  - []
f:
- "quoted \\" # x"
g:
"""
    assert load_yaml(text) == {
        "a": "1",
        "b": "x 'y' #not a comment",
        "c": [{"d": "line one\n  indented\n", "e": "folded text"}, "plain", []],
        "f": ['quoted " # x'],
        "g": None,
    }


# -------------------------------------------------------------- the files


def rule_files() -> list[Path]:
    files = sorted(p for p in RULES_DIR.glob("*.yml") if not p.name.endswith(".test.yml"))
    assert files, f"no rule files in {RULES_DIR}"
    return files


def promtool_test_files() -> list[Path]:
    files = sorted(RULES_DIR.glob("*.test.yml"))
    assert files, f"no promtool test files (*.test.yml) in {RULES_DIR}"
    return files


def rules() -> list[dict[str, Any]]:
    return [rule for path in rule_files() for group in load_yaml(path.read_text())["groups"] for rule in group["rules"]]


def alerts() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for rule in rules():
        if "alert" in rule:
            assert rule["alert"] not in found, f"alert {rule['alert']} defined twice"
            found[rule["alert"]] = rule
    return found


def recorded() -> set[str]:
    return {rule["record"] for rule in rules() if "record" in rule}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool not found: install it with `apt-get install prometheus` (Debian; `make test` installs it) "
            "to check deploy/prometheus/"
        )
    return path


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120, check=False)


# ----------------------------------------------------------------- promtool


def test_promtool_checks_the_rules(promtool: str) -> None:
    """`promtool check rules` on every rule file (*.yml but the *.test.yml
    files, which are not rule files); its count matches what load_yaml reads."""
    result = run(promtool, "check", "rules", *rule_files())
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    counted = sum(int(n) for n in re.findall(r"SUCCESS: (\d+) rules found", output))
    assert counted == len(rules()) > 0, output


def test_promtool_unit_tests_pass(promtool: str) -> None:
    result = run(promtool, "test", "rules", *promtool_test_files())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    """Each alert has a promtool case where it fires and one where it stays
    silent; a case naming an alert that does not exist would pass vacuously."""
    defined = alerts()
    firing: set[str] = set()
    silent: set[str] = set()
    for path in promtool_test_files():
        document = load_yaml(path.read_text())
        assert {(path.parent / f).resolve() for f in document["rule_files"]} == {p.resolve() for p in rule_files()}
        for case in document["tests"]:
            for check in case["alert_rule_test"]:
                name = check["alertname"]
                assert name in defined, f"{path.name}, {case['name']!r}: no alert named {name}"
                (firing if check.get("exp_alerts") else silent).add(name)
                for expected in check.get("exp_alerts") or []:
                    assert expected["exp_labels"]["severity"] == defined[name]["labels"]["severity"]
    assert set(defined) - firing == set(), "alerts never tested firing"
    assert set(defined) - silent == set(), "alerts never tested silent"


def test_alerts_have_severity_duration_and_advice() -> None:
    defined = alerts()
    assert set(defined) >= CRITICAL
    for name, rule in defined.items():
        assert name.startswith("Failoverd"), name
        severity = rule["labels"]["severity"]
        assert severity in SEVERITIES, name
        assert (severity == "critical") == (name in CRITICAL), name
        if "for" in rule:
            # A failover takes 1-2 s: a state alert must not fire on one scrape.
            assert re.fullmatch(r"\d+[sm]", rule["for"]) and _seconds(rule["for"]) >= 15, name
        else:
            assert "increase(" in rule["expr"], f"{name}: only counter events fire without for:"
        summary, description = rule["annotations"]["summary"], rule["annotations"]["description"]
        assert summary.startswith("failoverd: ") and "\n" not in summary, name
        assert "docs/" in description or "deploy/README.md" in description, f"{name}: no pointer to the docs"


def _seconds(duration: str) -> int:
    return int(duration[:-1]) * (60 if duration.endswith("m") else 1)


def test_annotations_quote_existing_doc_sections() -> None:
    """Every `docs/X.md, "Section"` an annotation points at is in that file."""
    quoted = 0
    for name, rule in alerts().items():
        text = " ".join(rule["annotations"].values())
        for path, places in re.findall(r'((?:docs|deploy)/[\w.-]+\.md)((?:, "[^"]+")+)', text):
            assert (ROOT / path).is_file(), f"{name}: {path}"
            content = (ROOT / path).read_text()
            for place in re.findall(r'"([^"]+)"', places):
                assert place in content, f'{name}: {path} has no "{place}"'
                quoted += 1
        for path in re.findall(r"\b((?:docs|deploy)/[\w./-]+\.md)\b", text):
            assert (ROOT / path).is_file(), f"{name}: {path}"
    assert quoted > 0


def test_the_lag_threshold_is_a_named_recording_rule() -> None:
    """Deployment-specific thresholds live in recording rules at the top of
    the rules, and the alert compares against them, not a literal."""
    assert "failoverd:replication_lag_warning_bytes" in recorded()
    assert "failoverd:replication_lag_warning_bytes" in alerts()["FailoverdReplicationLagHigh"]["expr"]
    assert not re.search(r"\d{4,}", alerts()["FailoverdReplicationLagHigh"]["expr"])


# ----------------------------------------------------------- metric names


def _member_status(name: str, **fields: Any) -> MemberStatus:
    base: dict[str, Any] = dict(
        name=name,
        role=Role.FOLLOWER,
        term=7,
        leader="db1",
        leader_live=True,
        pg=PgObservation(PgRole.STANDBY, 0.0, Position(2, 90_000), "db1"),
        pg_age_s=0.05,
        lease_remaining_s=None,
        promise_s=1.0,
        primary_ready=False,
        vip_held=False,
        vip_error=None,
        paused=False,
        primary_position=Position(2, 100_000),
        switchover_to=None,
        switchover_at=None,
        state_stamp=StateStamp(7, 12),
        history=(),
        rebuild=None,
        last_failover=None,
        sync_count=1,
    )
    return MemberStatus(**{**base, **fields})


def served_metrics() -> dict[str, dict[str, set[str]]]:
    """metric name -> label name -> values, from GET /metrics of a leader
    (lease, streaming standbys, a failover with its duration) and of a
    standby (replication lag), with every counter moved."""
    config = parse_config(CONFIG.read_text(), source=str(CONFIG))
    nodes = {n.name: n for n in config.nodes}
    counters = SupervisorCounters()
    counters.events.update({"election_started": 2, "fence": 1, "lease_lost": 1, "vote_granted": 3, "vote_refused": 1})
    counters.count(ev.RoleChanged(node="db1", term=7, role="leader", previous="candidate", reason="election"))
    counters.count(ev.Promoted(node="db1", term=7, position=Position(2, 100_000), reason="election", outage_s=1.2))
    leader = _member_status(
        "db1",
        role=Role.LEADER,
        leader="db1",
        pg=PgObservation(PgRole.PRIMARY, 0.0, Position(2, 100_000), None),
        lease_remaining_s=0.6,
        primary_ready=True,
        vip_held=True,
        last_failover=FailoverRecord(term=7, reason="election", outage_s=1.2, wall_time=1_700_000_000.0),
        streaming_standbys=2,
    )
    assert leader.writable
    standby = _member_status("db2")
    texts = [
        metrics_text(
            status,
            counters,
            node=nodes[status.name],
            peer_received=40,
            peer_rejected={"unauthenticated": 2, "stale": 1},
            api_rejected={"bad_token": 1},
        )
        for status in (leader, standby)
    ]
    found: dict[str, dict[str, set[str]]] = {}
    sample = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{(.*)\} \S+")
    for line in "\n".join(texts).splitlines():
        if not line or line.startswith("#"):
            continue
        match = sample.fullmatch(line)
        assert match, line
        labels = found.setdefault(match[1], {})
        for key, value in re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match[2]):
            labels.setdefault(key, set()).add(value)
    return found


@pytest.fixture(scope="module")
def metrics() -> dict[str, dict[str, set[str]]]:
    found = served_metrics()
    for needed in ("failoverd_primary", "failoverd_replication_lag_bytes", "failoverd_streaming_standbys"):
        assert needed in found, f"the fixture does not produce {needed}"
    assert all("member" in labels for labels in found.values())
    return found


_SELECTOR = re.compile(r"\b(failoverd_[a-z0-9_]+|failoverd:[a-z0-9_:]+|up)\b(\{[^}]*\})?")
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')


def check_expression(expr: str, metrics: dict[str, dict[str, set[str]]], where: str) -> set[str]:
    """Every failoverd metric in `expr` is served, with the labels and the
    label values its matchers name; recorded series are defined by a rule.
    Returns the names found."""
    names = set()
    for match in _SELECTOR.finditer(expr):
        name, braces = match[1], match[2] or ""
        names.add(name)
        if name == "up":
            continue
        if ":" in name:
            assert name in recorded(), f"{where}: {name} is recorded by no rule"
            continue
        assert name in metrics, f"{where}: {name} is not in GET /metrics (failoverd/api/views.py metrics_text)"
        for label, op, value in _MATCHER.findall(braces):
            if label in TARGET_LABELS or "$" in value:
                continue
            assert label in metrics[name], f"{where}: {name} has no label {label}"
            if op in ("=", "!="):
                wanted = {value}
            else:  # alternatives of a plain regex, e.g. "primary|standby"
                assert re.fullmatch(r"[\w|]+", value), f"{where}: {value!r}: use plain alternatives"
                wanted = set(value.split("|"))
            missing = wanted - metrics[name][label]
            assert not missing, f"{where}: {name}{{{label}}} has no value {sorted(missing)}"
    return names


def _template_actions(text: str) -> str:
    return " ".join(re.findall(r"\{\{.*?\}\}", text))


def test_rules_use_only_served_metrics(metrics: dict[str, dict[str, set[str]]]) -> None:
    used: set[str] = set()
    for rule in rules():
        where = rule.get("alert") or rule.get("record")
        used |= check_expression(rule["expr"], metrics, where)
        # queries run by the annotations' templates
        for text in (rule.get("annotations") or {}).values():
            used |= check_expression(_template_actions(text), metrics, f"{where} annotations")
    assert "failoverd_primary" in used and "up" in used


def test_rules_select_the_documented_job() -> None:
    """Every selector, in expressions and annotation queries, carries
    job="failoverd", the scrape job deploy/README.md tells to configure."""
    for rule in rules():
        where = rule.get("alert") or rule.get("record")
        texts = [rule["expr"], *(_template_actions(t) for t in (rule.get("annotations") or {}).values())]
        for text in texts:
            for match in _SELECTOR.finditer(text):
                if ":" in match[1]:
                    continue
                assert JOB in (match[2] or ""), f"{where}: {match[0]} without {JOB}"


# ---------------------------------------------------------------- dashboard


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows keep theirs inside


def dashboard_queries(board: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every panel target, annotation and variable query."""
    for panel in panels(board):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for annotation in board["annotations"]["list"]:
        if "expr" in annotation:
            yield f"annotation {annotation['name']!r}", annotation["expr"]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["definition"])
            assert match, variable["definition"]
            yield f"variable {variable['name']}", match[1]


def test_dashboard_is_a_grafana_dashboard() -> None:
    board = dashboard()
    assert board["title"] and board["uid"] == "failoverd" and isinstance(board["schemaVersion"], int)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["job"]["current"]["value"] == "failoverd"
    ids: set[int] = set()
    cells: set[tuple[int, int]] = set()
    with_targets = 0
    for panel in panels(board):
        assert isinstance(panel["id"], int) and panel["id"] not in ids, panel["title"]
        ids.add(panel["id"])
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in "xywh") and grid["x"] + grid["w"] <= 24, panel["title"]
        overlap = {
            (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not overlap & cells, f"panel {panel['title']!r} overlaps another"
        cells |= overlap
        if panel["type"] == "row":
            continue
        assert panel["type"] in {"stat", "timeseries", "state-timeline", "table"}, panel["type"]
        assert panel["title"] and panel["description"], panel["id"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        targets = panel["targets"]
        assert targets, f"panel {panel['title']!r} has no targets"
        assert len({t["refId"] for t in targets}) == len(targets)
        for target in targets:
            assert target["datasource"] == panel["datasource"] and target["expr"].strip()
        with_targets += 1
    assert with_targets >= 10
    for where, expr in dashboard_queries(board):
        for variable in re.findall(r"\$\{?(\w+)", expr):
            assert variable in variables or variable in GRAFANA_VARIABLES, f"{where}: ${variable} is not defined"


def test_dashboard_uses_only_served_metrics(metrics: dict[str, dict[str, set[str]]]) -> None:
    used: set[str] = set()
    for where, expr in dashboard_queries(dashboard()):
        names = check_expression(expr, metrics, where)
        assert names, f"{where}: no failoverd metric in {expr!r}"
        used |= names
    # The panels the issue asks for: roles, lease, lag, quorum, failovers.
    for needed in (
        "failoverd_primary",
        "failoverd_role",
        "failoverd_lease_remaining_seconds",
        "failoverd_replication_lag_bytes",
        "failoverd_streaming_standbys",
        "failoverd_sync_count",
        "failoverd_failovers_total",
        "failoverd_last_failover_duration_seconds",
        "failoverd_postgres_state",
    ):
        assert needed in used, f"the dashboard shows no {needed}"


def test_dashboard_queries_are_promql(promtool: str, tmp_path: Path) -> None:
    """Each dashboard query, with its variables filled in, is valid PromQL:
    promtool checks them as recording rules."""
    values = {"job": "failoverd", "cluster": ".*", "member": ".*", "__rate_interval": "1m", "__interval": "15s"}
    rules_text = "groups:\n  - name: dashboard\n    rules:\n"
    for n, (_, expr) in enumerate(dashboard_queries(dashboard())):
        filled = re.sub(r"\$\{?(\w+)\}?", lambda m: values[m[1]], expr)
        rules_text += f"      - record: dashboard:query_{n}\n        expr: {json.dumps(filled)}\n"
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(rules_text)
    result = run(promtool, "check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr
