"""The whole human-feedback loop from the command line: init, users, push from the lab's SFT policy, serve,
20 labels through the API with a bearer token, export, and DPO on the export."""

from __future__ import annotations

import json

import httpx

from rlhflab.cli import main
from rlhflab.lab.tasks import get_task
from rlhflab.lab.tasks.base import chat_prompt

from .conftest import free_port, start_server, stop_server


def _cli(capsys, *argv) -> str:
    capsys.readouterr()
    assert main(list(argv)) == 0, argv
    return capsys.readouterr().out


def test_label_push_serve_export_dpo(tmp_path, tiny_lab_cache, capsys):
    db = f"sqlite:///{tmp_path / 'labels.db'}"
    sft = tmp_path / "sft"
    _cli(
        capsys,
        "sft",
        "--config",
        "configs/sft_tiny.yaml",
        "model.name_or_path=lab:sentiment:tiny",
        "optim.max_steps=3",
        f"logging.output_dir={sft}",
    )
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt": chat_prompt(p)}) + "\n"
            for p in get_task("sentiment").train_prompts(24, seed=0)
        )
    )

    assert "schema 0001" in _cli(capsys, "label", "init", "--db", db)
    out = _cli(
        capsys,
        "label",
        "push",
        "--db",
        db,
        "--project",
        "demo",
        "--policy",
        str(sft / "final"),
        "--prompts",
        str(prompts),
        "--k",
        "2",
        "--max-new-tokens",
        "16",
    )
    queued = int(
        out.split()[1]
    )  # "queued N pairwise items ..." (prompts whose two samples repeat are left out)
    assert out.startswith("queued") and "pairwise items in project demo" in out and queued >= 20, out
    token = _cli(capsys, "label", "add-user", "ann", "--db", db, "--project", "demo").strip()

    port = free_port()
    server = start_server(db, port, tmp_path / "server.log")
    try:
        base = f"http://127.0.0.1:{port}"
        refused = httpx.post(
            f"{base}/api/labels", json={"assignment": 1, "key": "k", "label": {"choice": "tie"}}
        )
        assert refused.status_code == 401
        auth = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=base, headers=auth, timeout=30) as client:
            for n in range(20):
                item = client.get("/api/next", params={"project": "demo"}).json()["item"]
                assert item["kind"] == "pairwise" and len(item["responses"]) == 2
                # Prefer the longer response (a rule a person could follow); ties of length go to A.
                a, b = (r["text"] for r in item["responses"])
                label = {"choice": "A" if len(a) >= len(b) else "B", "strength": "better"}
                r = client.post(
                    "/api/labels", json={"assignment": item["assignment"], "key": f"k{n}", "label": label}
                )
                assert r.status_code == 201, r.text
    finally:
        stop_server(server)

    pairs = tmp_path / "prefs.jsonl"
    assert "wrote 20 pairs" in _cli(
        capsys, "label", "export", "--db", db, "--project", "demo", "--format", "pairs", "--out", str(pairs)
    )
    records = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert len(records) == 20 and all(r["annotator"] == "ann" and r["rating"] == "better" for r in records)
    assert all(len(r["chosen"]) >= len(r["rejected"]) for r in records)

    stats = json.loads(_cli(capsys, "label", "stats", "--db", db, "--project", "demo", "--json"))
    assert stats["counts"]["labels"] == 20 and stats["annotators"]["ann"]["labels"] == 20
    assert stats["position_bias"]["decided"] == 20

    dpo = tmp_path / "dpo"
    _cli(
        capsys,
        "dpo",
        "--config",
        "configs/dpo_tiny.yaml",
        f"model.name_or_path={sft / 'final'}",
        f"data.train_path={pairs}",
        "data.eval_fraction=0",
        "optim.batch_size=4",
        "optim.max_steps=3",
        f"logging.output_dir={dpo}",
    )
    assert (dpo / "final" / "config.json").exists()
