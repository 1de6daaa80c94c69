"""The docs' dashboard and rules reference only metrics a live orchestrator exports."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import promql_parser
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.stack import http_url, running_service

DOCS = Path(__file__).resolve().parent.parent / "docs"
NAME = re.compile(r"\b((?:tally|gen_ai)_[a-z_]+)\b")
SUFFIXES = ("", "_total", "_bucket", "_sum", "_count", "_created")


def exported(text: str) -> set[str]:
    """Every series name the exposition can produce, from the real parser."""
    names = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in SUFFIXES)
    return names


GENAI_LABELS = {
    "gen_ai_operation_name",
    "gen_ai_provider_name",
    "gen_ai_request_model",
    "gen_ai_token_type",
}


def referenced() -> dict[str, set[str]]:
    """Metric names used by the dashboard, the rules and the metrics reference."""
    dashboard = json.loads((DOCS / "grafana" / "tally.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    return {
        "grafana": {n for e in exprs for n in NAME.findall(e)},
        "rules": set(NAME.findall((DOCS / "prometheus" / "tally.rules.yml").read_text())),
        "metrics.md": set(NAME.findall((DOCS / "metrics.md").read_text())) - GENAI_LABELS,
    }


async def test_docs_reference_only_exported_metrics(db_url: str) -> None:
    """Every metric name in the dashboard, rules and reference is served by /metrics."""
    async with running_service(db_url) as service:
        url = http_url(service, "/metrics")
        text = await asyncio.to_thread(
            lambda: urllib.request.urlopen(url, timeout=5).read().decode()
        )
    names = exported(text)
    for source, used in referenced().items():
        assert used, source
        assert used <= names, f"{source} uses unknown metrics: {sorted(used - names)}"


def test_rules_and_dashboard_are_valid_promql() -> None:
    """Every rule and dashboard query parses as PromQL, every rule is well formed, and the
    rules file passes `promtool check rules` where promtool is installed (`.ci/run` does)."""
    rules_file = DOCS / "prometheus" / "tally.rules.yml"
    groups = yaml.safe_load(rules_file.read_text())["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) >= 6
    for rule in rules:
        assert ("record" in rule) != ("alert" in rule), rule
        if "record" in rule:
            assert re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["record"]), rule["record"]
        else:
            assert {"summary"} <= set(rule.get("annotations", {})), rule["alert"]
            assert re.fullmatch(r"\d+[smhd]", rule.get("for", "0s")), rule["alert"]
    dashboard = json.loads((DOCS / "grafana" / "tally.json").read_text())
    exprs = [r["expr"] for r in rules]
    exprs += [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    for expr in exprs:
        try:
            promql_parser.parse(expr)
        except ValueError as exc:
            raise AssertionError(f"not PromQL ({exc}): {expr}") from None
    promtool = shutil.which("promtool")
    if promtool is not None:
        result = subprocess.run(
            [promtool, "check", "rules", str(rules_file)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        # The budget alerts fire at 80 % and at 100 % (promtool's rule unit tests).
        result = subprocess.run(
            [promtool, "test", "rules", "tally.rules.test.yml"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=DOCS / "prometheus",
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_config_reference_is_current() -> None:
    """docs/operating.md carries the configuration reference the CLI generates today."""
    from tests.docgen import BEGIN, END, config_reference

    text = (DOCS / "operating.md").read_text()
    section = text.split(BEGIN, 1)[1].split(END, 1)[0]
    assert section.strip() == config_reference().strip()


def test_provider_mapping_table_names_real_tests() -> None:
    """Every test the provider mapping table in docs/protocol.md cites exists."""
    tests_dir = Path(__file__).resolve().parent
    defined = {
        m
        for f in tests_dir.glob("test_*.py")
        for m in re.findall(r"^(?:async )?def (test_\w+)", f.read_text(), re.MULTILINE)
    }
    table = [
        line
        for line in (DOCS / "protocol.md").read_text().splitlines()
        if line.startswith("| ") and "test" in line
    ]
    cited = {name for line in table for name in re.findall(r"\b(test_\w+)\b", line)}
    cited -= {"test_executor_" + p for p in ("anthropic", "openai", "ollama", "gemini")}
    cited -= {"test_executor_claude_agent", "test_e2e_daemon", "test_ledger_truth"}
    assert len(cited) >= 15
    assert cited <= defined, sorted(cited - defined)
