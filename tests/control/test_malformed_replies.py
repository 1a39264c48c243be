"""A daemon that answers badly: a real Unix-socket server written here answers every
request with the line a test gives it, and the real CLI (`volunteer status`, in-process)
must say what is wrong in one line naming the method, and exit with 1."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from volunteer import cli
from volunteer.client.loop_thread import LoopThread
from volunteer.control.client import ControlClient
from volunteer.control.endpoint import MalformedReplyError, private_dir, socket_path, use_tcp
from volunteer.control.messages import STATUS, SWARM
from volunteer.paths import Paths

pytestmark = pytest.mark.skipif(use_tcp(), reason="the Unix-socket path is tested here")


class ScriptedDaemon:
    """Listens on the instance's control socket; answers each request line with `answer`."""

    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self.answer = b""
        self.requests: list[dict[str, object]] = []
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        path = socket_path(self.paths)
        private_dir(path.parent)
        self._server = await asyncio.start_unix_server(self._serve, path=str(path))

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                self.requests.append(json.loads(line))
                writer.write(self.answer)
                await writer.drain()
        finally:
            writer.close()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def daemon(home: Path) -> Iterator[ScriptedDaemon]:
    loop = LoopThread()
    scripted = ScriptedDaemon(Paths.resolve(home=home, env={}))
    loop.run(scripted.start())
    try:
        yield scripted
    finally:
        loop.run(scripted.close())
        loop.close()


def _line(message: object) -> bytes:
    return json.dumps(message).encode() + b"\n"


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        (b"this is no JSON\n", "status: the daemon sent something that is not JSON"),
        (_line([1, 2]), 'status: the daemon\'s answer has no "ok" flag'),
        (_line({"result": {"state": "serving"}}), 'status: the daemon\'s answer has no "ok" flag'),
        (_line({"ok": True, "result": {"pid": 7}}), "status: the daemon's reply is malformed: "
         "state: Field required"),
        (_line({"ok": True, "result": {"state": 42}}), "status: the daemon's reply is malformed: "
         "state: Input should be"),
        (_line({"ok": True, "result": {"state": "dancing"}}), "status: the daemon's reply is "
         "malformed: state: Input should be 'not_running'"),
        (_line({"ok": True, "result": {"state": "serving", "blocks": "all"}}), "status: the "
         "daemon's reply is malformed: blocks: Input should be a valid tuple"),
        (_line({"ok": True, "result": "serving"}), "status: the daemon's reply is malformed"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("as_json", [False, True])
def test_a_malformed_status_is_one_clear_line_and_exit_1(
    daemon: ScriptedDaemon,
    home: Path,
    capsys: pytest.CaptureFixture[str],
    answer: bytes,
    said: str,
    as_json: bool,
) -> None:
    daemon.answer = answer
    code = cli.main(["--home", str(home), "status", *(["--json"] if as_json else [])])
    out, err = capsys.readouterr()
    assert code == 1
    assert out == ""
    assert err.startswith(f"volunteer: error: {said}"), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert daemon.requests == [{"method": "status", "params": {}}]


def test_fields_a_newer_daemon_adds_are_ignored(
    daemon: ScriptedDaemon, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.answer = _line({"ok": True, "result": {"state": "serving", "pid": 7, "gpu": "x"}})
    assert cli.main(["--home", str(home), "status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"state": "serving", "pid": 7}
    assert cli.main(["--home", str(home), "status"]) == 0
    table = capsys.readouterr().out
    assert "serving" in table and "7" in table


def test_a_malformed_reply_names_its_method(daemon: ScriptedDaemon) -> None:
    daemon.answer = _line({"ok": True, "result": {"model": "m", "num_blocks": -1}})
    with pytest.raises(MalformedReplyError, match=r"swarm: .* num_blocks: Input should be"):
        ControlClient(daemon.paths).call(SWARM)
    daemon.answer = _line({"ok": True, "result": {"state": "serving"}})
    assert ControlClient(daemon.paths).call(STATUS).state == "serving"
