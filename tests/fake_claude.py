"""A stand-in for the ``claude`` CLI: speaks its stream-json protocol on stdin/stdout.

The Claude Agent SDK starts ``claude --output-format stream-json --input-format
stream-json ...``, sends an ``initialize`` control request and then the user's message,
and reads newline-delimited JSON messages until a ``result``. This program answers the
control requests as the CLI does and, once the user message arrives, prints the scripted
messages of ``$FAKE_CLAUDE_SCENARIO`` (a JSON file) in the CLI's real shapes.

Scenario keys: ``messages`` (list, printed in order; ``session_id`` and ``uuid`` are
filled in), ``after`` (``"exit"`` with ``exitCode``, or ``"hang"``: what to do after the
messages instead of waiting for stdin to close), ``argvFile`` (where to write argv as JSON).
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from typing import Any

VERSION = "2.1.330"


def emit(message: dict[str, Any]) -> None:
    """One line of stream-json on stdout."""
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def init_message(session_id: str, model: str) -> dict[str, Any]:
    """The ``system/init`` message the CLI prints before the first turn."""
    return {
        "type": "system",
        "subtype": "init",
        "cwd": os.getcwd(),
        "session_id": session_id,
        "tools": ["Bash", "Read", "Glob"],
        "mcp_servers": [],
        "model": model,
        "permissionMode": "default",
        "slash_commands": [],
        "apiKeySource": "ANTHROPIC_API_KEY",
        "claude_code_version": VERSION,
        "output_style": "default",
        "agents": [],
        "skills": [],
        "plugins": [],
        "uuid": str(uuid.uuid4()),
    }


def main() -> int:
    """Serve one query as the CLI would."""
    with open(os.environ["FAKE_CLAUDE_SCENARIO"], encoding="utf-8") as f:
        scenario = json.load(f)
    if scenario.get("argvFile"):
        with open(scenario["argvFile"], "w", encoding="utf-8") as f:
            json.dump(sys.argv[1:], f)
    model = sys.argv[sys.argv.index("--model") + 1] if "--model" in sys.argv else "default"
    session_id = str(uuid.uuid4())
    for line in sys.stdin:
        if not line.strip():
            continue
        message = json.loads(line)
        if message.get("type") == "control_request":
            request = message["request"]
            response: dict[str, Any] = {}
            if request.get("subtype") == "initialize":
                response = {"commands": [], "output_style": "default", "models": []}
            emit(
                {
                    "type": "control_response",
                    "response": {
                        "subtype": "success",
                        "request_id": message["request_id"],
                        "response": response,
                    },
                }
            )
        elif message.get("type") == "user":
            emit(init_message(session_id, model))
            for scripted in scenario["messages"]:
                emit({**scripted, "session_id": session_id, "uuid": str(uuid.uuid4())})
                time.sleep(float(scenario.get("delay", 0)))
            if scenario.get("after") == "exit":
                sys.stderr.write("fatal: the API connection was reset\n")
                return int(scenario.get("exitCode", 1))
            if scenario.get("after") == "hang":
                time.sleep(3600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
