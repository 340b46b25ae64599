"""The workers' shared state (service/repository_sync.py): a missing or unreadable file is rebuilt from what is
served, never read as "serve nothing"; control calls are ordered by the ticket taken when they were asked; the
background loops are restarted when they fail."""

from __future__ import annotations

import asyncio
import json

import pytest

from service.repository_sync import SharedState, follow, supervised


class FakeRepository:
    """What follow() uses of a ModelRepository: versions(), load(), unload()."""

    def __init__(self, served: dict[str, str]):
        self.served = dict(served)
        self.calls: list[tuple] = []
        self.looks = 0

    def versions(self) -> dict[str, str]:
        self.looks += 1  # one per round of following
        return dict(self.served)

    async def load(self, name, version, announce=True):
        self.calls.append(("load", name, version))
        self.served[name] = version

    async def unload(self, name, announce=True):
        self.calls.append(("unload", name))
        self.served.pop(name, None)


def run(coroutine, timeout: float = 20.0):
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


async def until(condition, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_a_missing_or_unreadable_file_is_none_never_an_empty_set_of_models(tmp_path):
    shared = SharedState(tmp_path / "served.json")
    assert shared.wanted() is None
    for broken in ("", "{not json", "[]", '{"seq": 1}', '{"seq": "x", "models": {}}', '{"seq": 1, "models": {"a": 3}}'):
        shared.path.write_text(broken)
        assert shared.wanted() is None, broken
    shared.write({"a": "1", "b": "2"})
    assert shared.wanted() == {"a": "1", "b": "2"}


@pytest.mark.parametrize("damage", ["delete", "garbage"])
def test_follow_rebuilds_a_lost_file_from_what_is_served_and_unloads_nothing(tmp_path, damage):
    shared = SharedState(tmp_path / "served.json")
    shared.write({"shapes": "1", "other": "3"})
    repository = FakeRepository({"shapes": "1", "other": "3"})

    async def scenario():
        task = asyncio.create_task(follow(repository, shared, interval_s=0.01))
        await until(lambda: repository.looks >= 2)  # following
        if damage == "delete":
            shared.path.unlink()
        else:
            shared.path.write_text("{garbage")
        await until(lambda: shared.wanted() is not None)
        rebuilt_at = repository.looks
        await until(lambda: repository.looks >= rebuilt_at + 5)  # several more rounds of following
        task.cancel()

    run(scenario())
    assert repository.calls == []  # nothing unloaded, nothing reloaded
    assert shared.wanted() == {"shapes": "1", "other": "3"}


def test_the_call_asked_last_wins_whichever_finishes_last(tmp_path):
    shared = SharedState(tmp_path / "served.json")
    shared.write({"shapes": "1"})
    early, late = shared.ticket(), shared.ticket()  # a load of v2 asked, then a rollback to v1 asked
    assert shared.update("shapes", "1", late)  # the rollback finishes first
    assert not shared.update("shapes", "2", early)  # the earlier load finishes later: superseded
    assert shared.wanted() == {"shapes": "1"}
    unload = shared.ticket()
    assert shared.update("shapes", None, unload)
    assert not shared.update("shapes", "2", late)  # an older answer cannot bring an unloaded model back
    assert shared.wanted() == {}
    assert json.loads(shared.path.read_text())["models"]["shapes"] == {"version": None, "seq": unload}


def test_tickets_increase_across_processes_sharing_the_file(tmp_path):
    import multiprocessing

    path = tmp_path / "served.json"
    SharedState(path).write({})
    context = multiprocessing.get_context("spawn")
    with context.Pool(3) as pool:
        tickets = pool.map(_tickets, [str(path)] * 3)
    flat = sorted(t for batch in tickets for t in batch)
    assert flat == list(range(1, 61))  # 60 distinct tickets, none lost or repeated


def _tickets(path: str) -> list[int]:
    shared = SharedState(path)
    return [shared.ticket() for _ in range(20)]


def test_a_failing_loop_is_restarted_with_a_backoff_counted_and_logged(monkeypatch, caplog):
    from service import repository_sync

    monkeypatch.setattr(repository_sync, "SUPERVISED_BACKOFF_S", (0.01, 0.02))
    runs, restarts = [], []

    async def flaky():
        runs.append(len(runs))
        if len(runs) < 4:
            raise OSError("the state file's disk went away")
        await asyncio.sleep(3600)

    async def scenario():
        task = asyncio.create_task(supervised("test loop", flaky, lambda: restarts.append(1)))
        await until(lambda: len(runs) == 4)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(scenario())
    assert len(restarts) == 3
    assert caplog.text.count("test loop failed; starting it again") == 3
    assert "the state file's disk went away" in caplog.text  # with its traceback
