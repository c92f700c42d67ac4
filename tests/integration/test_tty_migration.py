"""A container with a terminal (``run -it``, issue 17) migrated between two real node
services: the interactive shell, its variables and its terminal's settings arrive, and
``attach`` on the destination reaches it, ^C and detach included."""

from __future__ import annotations

import json

import pytest

from tests.helpers.nodes import Cluster2
from tests.helpers.skips import needs_criu
from tests.helpers.terminal import Terminal, check_shell_came_back, set_up_shell

pytestmark = [pytest.mark.root, pytest.mark.criu, needs_criu]


@pytest.mark.parametrize("strategy", ["cold", "postcopy"])
def test_interactive_shell_migrates_with_its_terminal(nodes: Cluster2, strategy: str) -> None:
    n1, n2 = nodes.local("node1"), nodes.local("node2")
    name = f"sh-{strategy}"
    with Terminal(n1.root, "run", "-it", "--name", name, "busybox", "sh") as t:
        set_up_shell(t)
    rep = json.loads(nodes.op("migrate", name, "node2", "--strategy", strategy, "--json").stdout)
    assert rep["resume_confirmed"] is True and rep["strategy"] == strategy
    nodes.assert_only_on(name, "node2")
    p = n1.run("attach", name, check=False)  # the source's copy is gone, and says so
    assert p.returncode != 0 and p.stderr.count("\n") == 1, p.stderr
    with Terminal(n2.root, "attach", name) as t:
        check_shell_came_back(n2, t, name)
    with Terminal(n2.root, "attach", name) as t:
        t.wait_raw()
        t.send(b"exit 6\r")
        assert t.wait() == 6
