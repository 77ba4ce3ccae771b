"""Planning: groups by (mode, width, height), batches by batch key and size, first-seen order."""
from __future__ import annotations

import pytest

from batch.job import Job
from batch.manifest import load_manifest
from batch.plan import auto_batch_size, make_plan
from conftest import write_jsonl


def job(id: str, mode: str = "txt2img", width: int = 64, height: int = 64, steps: int = 3, cfg: float = 7.5,
        scheduler: str = "euler", strength: float | None = None, num_images: int = 1, lora: str | None = None) -> Job:
    return Job(id=id, line=0, stem=id, mode=mode, prompt=f"prompt {id}", negative_prompt="", width=width,
               height=height, steps=steps, cfg=cfg, seed=0, num_images=num_images, scheduler=scheduler,
               strength=strength if mode == "img2img" else None, lora=lora)


def tasks_of(*jobs: Job):
    return [t for j in jobs for t in j.images("")]


def layout(plan) -> list[tuple]:
    """((mode, width, height), [[stem, ...] per batch]) per group."""
    return [((g.mode, g.width, g.height), [[t.stem for t in b.tasks] for b in g.batches]) for g in plan.groups]


def test_groups_by_mode_and_size_in_first_seen_order():
    plan = make_plan(tasks_of(
        job("a", width=64), job("b", mode="img2img", strength=0.5), job("c", width=128),
        job("d", width=64), job("e", width=64, height=128), job("f", mode="img2img", strength=0.5),
    ), "tiny", batch_size=8)

    assert layout(plan) == [
        (("txt2img", 64, 64), [["a", "d"]]),
        (("img2img", 64, 64), [["b", "f"]]),
        (("txt2img", 128, 64), [["c"]]),
        (("txt2img", 64, 128), [["e"]]),
    ]
    assert [g.model for g in plan.groups] == ["tiny"] * 4
    assert plan.models() == ["tiny"]


@pytest.mark.parametrize("change", [
    {"steps": 5}, {"cfg": 3.0}, {"scheduler": "ddim"},
])
def test_batch_key_splits_batches_within_a_group(change):
    plan = make_plan(tasks_of(job("a"), job("b", **change), job("c"), job("d", **change)), "tiny", batch_size=8)
    assert layout(plan) == [(("txt2img", 64, 64), [["a", "c"], ["b", "d"]])]
    for batch in plan.groups[0].batches:
        assert len({t.job.batch_key() for t in batch.tasks}) == 1


def test_strength_splits_img2img_batches():
    plan = make_plan(tasks_of(
        job("a", mode="img2img", strength=0.5), job("b", mode="img2img", strength=0.7),
        job("c", mode="img2img", strength=0.5),
    ), "tiny", batch_size=8)
    assert layout(plan) == [(("img2img", 64, 64), [["a", "c"], ["b"]])]


def test_prompts_and_seeds_may_share_a_batch():
    a, b = job("a"), job("b")
    b = Job(**{**b.__dict__, "seed": 99, "negative_prompt": "blurry"})
    plan = make_plan(tasks_of(a, b), "tiny", batch_size=8)
    assert layout(plan) == [(("txt2img", 64, 64), [["a", "b"]])]


def test_lora_splits_groups():
    plan = make_plan(tasks_of(job("a"), job("b", lora="style"), job("c")), "tiny", batch_size=8)
    assert [(g.lora, [t.stem for b in g.batches for t in b.tasks]) for g in plan.groups] == [
        (None, ["a", "c"]), ("style", ["b"])]
    assert plan.groups[1].name == "tiny txt2img 64x64+style"  # the model too: groups of two models differ


def test_batch_size_splits_and_images_of_a_row_span_batches():
    plan = make_plan(tasks_of(job("a", num_images=3), job("b"), job("c", num_images=2)), "tiny", batch_size=2)
    assert layout(plan) == [(("txt2img", 64, 64), [["a-0", "a-1"], ["a-2", "b"], ["c-0", "c-1"]])]
    assert plan.batches == 3 and plan.images == 6


def test_batch_indexes_run_across_groups():
    plan = make_plan(tasks_of(job("a"), job("b"), job("c"), job("d", width=128)), "tiny", batch_size=2)
    assert [b.index for g in plan.groups for b in g.batches] == [0, 1, 2]
    assert plan.groups[0].batches[1].job.id == "c"


def test_total_images_preserved_and_each_task_once():
    jobs = [job(f"j{i}", width=64 * (1 + i % 2), steps=3 + i % 3, num_images=1 + i % 4) for i in range(25)]
    tasks = tasks_of(*jobs)

    plan = make_plan(tasks, "tiny", batch_size=3)

    planned = [t for g in plan.groups for b in g.batches for t in b.tasks]
    assert plan.images == len(tasks) == sum(j.num_images for j in jobs)
    assert sum(g.images for g in plan.groups) == plan.images
    assert sorted(t.key for t in planned) == sorted(t.key for t in tasks)
    assert all(1 <= len(b.tasks) <= 3 for g in plan.groups for b in g.batches)
    for g in plan.groups:
        for b in g.batches:
            assert {(t.job.mode, t.job.width, t.job.height) for t in b.tasks} == {(g.mode, g.width, g.height)}


def test_empty_task_list_gives_empty_plan():
    plan = make_plan([], "tiny", batch_size=4)
    assert plan.groups == () and plan.images == 0 and plan.batches == 0


@pytest.mark.parametrize("device, width, height, expected", [
    ("cpu", 512, 512, 4),
    ("cpu", 64, 64, 4),
    ("cuda", 512, 512, 8),
    ("cuda:1", 512, 512, 8),
    ("cuda", 768, 768, 3),
    ("cuda", 1024, 1024, 2),
    ("cuda", 4096, 4096, 1),
    ("cuda", 64, 64, 16),
])
def test_auto_batch_size(device, width, height, expected):
    assert auto_batch_size(device, width, height) == expected


def test_no_batch_size_uses_auto_per_group():
    jobs = [job(f"s{i}") for i in range(20)] + [job(f"b{i}", width=1024, height=1024) for i in range(5)]
    plan = make_plan(tasks_of(*jobs), "tiny", batch_size=None, device="cuda")
    small, big = plan.groups
    assert [len(b.tasks) for b in small.batches] == [16, 4]
    assert [len(b.tasks) for b in big.batches] == [2, 2, 1]
    cpu = make_plan(tasks_of(*jobs), "tiny", batch_size=None, device="cpu")
    assert [len(b.tasks) for b in cpu.groups[0].batches] == [4] * 5


def test_plan_from_a_manifest(images_dir):
    path = write_jsonl(images_dir / "m.jsonl", [
        {"id": "t1", "prompt": "x", "num_images": 3, "steps": 3, "width": 64, "height": 64},
        {"id": "i1", "prompt": "x", "init_image": "init.png", "steps": 3, "width": 64, "height": 64},
        {"id": "t2", "prompt": "y", "steps": 3, "width": 64, "height": 64},
        {"id": "t3", "prompt": "z", "steps": 4, "width": 64, "height": 64},
        {"id": "p1", "prompt_image": "prompt.png", "image_prompt_method": "clip_embed", "steps": 3},
    ])
    tasks = tasks_of(*load_manifest(path).jobs)

    plan = make_plan(tasks, "tiny", batch_size=2)

    assert layout(plan) == [
        (("txt2img", 64, 64), [["t1-0", "t1-1"], ["t1-2", "t2"], ["t3"]]),
        (("img2img", 64, 64), [["i1"]]),
        (("image_prompt", 512, 512), [["p1"]]),
    ]
    assert plan.images == 7
