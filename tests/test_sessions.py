"""Session metadata: set at first enqueue, filterable with `fleet sessions list --where`."""

from __future__ import annotations

from tests.processes import fleet, fleet_json


async def test_sessions_list_filters_on_metadata(conn, fleet_env):
    await conn.execute("""SELECT fleet.enqueue(session_id => 'a1', body => 'x',
                                              metadata => '{"tenant": "acme", "tier": 3}')""")
    await conn.execute("""SELECT fleet.enqueue(session_id => 'a1', body => 'y',
                                              metadata => '{"tenant": "ignored later"}')""")
    await conn.execute("""SELECT fleet.enqueue(session_id => 'b1', body => 'x',
                                              metadata => '{"tenant": "globex"}')""")
    acme = fleet_json("sessions", "list", "--where", "tenant=acme", env=fleet_env)
    assert [s["session_id"] for s in acme] == ["a1"]
    assert acme[0]["messages"] == 2 and acme[0]["metadata"]["tier"] == 3
    both = fleet_json("sessions", "list", env=fleet_env)
    assert {s["session_id"] for s in both} == {"a1", "b1"}
    typed = fleet_json("sessions", "list", "--where", "tier=3", "--where", "tenant=acme",
                       env=fleet_env)
    assert [s["session_id"] for s in typed] == ["a1"]
    bad = fleet("sessions", "list", "--where", "nonsense", env=fleet_env)
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr
