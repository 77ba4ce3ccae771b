"""Compare two report.json files (nightly runs): per-group images/s, s/image p50/p95, peak VRAM and failures.

Groups are matched on (model, mode, width, height); where one side holds several groups with
that key (one per LoRA), they are matched on `lora` too. A matched group regresses when its
images/s drops, or its peak VRAM grows, by more than the threshold. Groups found on one side
only are listed as added or missing: a changed manifest is not a regression by itself.

images/s is generation throughput (no model load, no warm-up). s/image p50/p95 are each image's
share of its batch (batch generation time ÷ batch size), not the latency of one image; they are
shown, not gated.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BatchError

DEFAULT_MAX_REGRESSION = 10.0  # percent
# (report key, label, True when bigger is better); only the first and the VRAM one gate the verdict
METRICS = (
    ("images_per_s", "images/s (generation)", True),
    ("s_per_image_p50", "s/image p50 (batch s ÷ batch size)", False),
    ("s_per_image_p95", "s/image p95 (batch s ÷ batch size)", False),
    ("peak_vram_bytes", "peak VRAM", False),
)
GATED = ("images_per_s", "peak_vram_bytes")
GROUP_KEYS = ("model", "mode", "width", "height")


@dataclass(frozen=True)
class Delta:
    old: float | None
    new: float | None

    @property
    def pct(self) -> float | None:
        """Change in percent of the old value; None when either side is missing or old is 0."""
        if self.old is None or self.new is None or self.old == 0:
            return None
        return (self.new - self.old) / self.old * 100.0


@dataclass(frozen=True)
class GroupComparison:
    old: dict
    new: dict
    metrics: dict[str, Delta]
    failed: Delta
    regressions: tuple[str, ...]  # metric keys beyond the threshold

    @property
    def name(self) -> str:
        return group_name(self.new)


@dataclass
class Comparison:
    max_regression: float
    old_run: dict
    new_run: dict
    # (the run number a report's figures are from, the folder's latest run): a rerun that made nothing
    # leaves its report on the last run that made images, and the comparison says so
    old_shown: tuple = (None, None)
    new_shown: tuple = (None, None)
    matched: list[GroupComparison] = field(default_factory=list)
    added: list[dict] = field(default_factory=list)  # in NEW only
    missing: list[dict] = field(default_factory=list)  # in OLD only
    notes: list[str] = field(default_factory=list)

    @property
    def regressed(self) -> list[GroupComparison]:
        return [g for g in self.matched if g.regressions]

    @property
    def ok(self) -> bool:
        return not self.regressed


def load_report(path: Path) -> dict:
    """A report.json, or the one in an output folder; anything else is a BatchError."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BatchError(f"{path}: no such file (give a report.json or an sdbatch output folder)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BatchError(f"{path}: cannot read it ({e})") from None
    try:
        report = json.loads(text)
    except ValueError as e:
        raise BatchError(f"{path}: not JSON ({e})") from None
    check_report(report, str(path))
    return report


def check_report(report, where: str) -> None:
    """Raise a BatchError unless `report` has the report.json shape compare relies on."""
    if not isinstance(report, dict) or not isinstance(report.get("groups"), list) \
            or not isinstance(report.get("totals", {}), dict) or not isinstance(report.get("run", {}), dict):
        raise BatchError(f"{where}: not an sdbatch report (expected an object with 'run', 'totals' and 'groups')")
    for i, group in enumerate(report["groups"]):
        if not isinstance(group, dict) or any(k not in group for k in GROUP_KEYS + ("images_per_s",)):
            raise BatchError(f"{where}: groups[{i}] lacks one of {', '.join(GROUP_KEYS + ('images_per_s',))}")
        for key, _label, _up in METRICS:
            value = group.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise BatchError(f"{where}: groups[{i}].{key} is {value!r}, expected a number or null")


def group_name(group: dict) -> str:
    name = f"{group['model']} {group['mode']} {group['width']}x{group['height']}"
    return name + (f" lora={group['lora']}" if group.get("lora") else "")


def compare(old: dict, new: dict, max_regression: float = DEFAULT_MAX_REGRESSION) -> Comparison:
    """Match the groups of two reports and flag those beyond `max_regression` percent."""
    result = Comparison(max_regression=max_regression, old_run=old.get("run") or {}, new_run=new.get("run") or {},
                        old_shown=(old.get("reported_run"), old.get("latest_run")),
                        new_shown=(new.get("reported_run"), new.get("latest_run")))
    for old_group, new_group in _match(old["groups"], new["groups"], result):
        metrics = {key: Delta(old_group.get(key), new_group.get(key)) for key, _label, _up in METRICS}
        regressions = tuple(key for key in GATED if _beyond(key, metrics[key], max_regression))
        failed = Delta(old_group.get("failed"), new_group.get("failed"))
        result.matched.append(GroupComparison(old_group, new_group, metrics, failed, regressions))
    _add_notes(result)
    return result


def _match(old_groups: list[dict], new_groups: list[dict], result: Comparison) -> list[tuple[dict, dict]]:
    def buckets(groups):
        out: dict[tuple, list[dict]] = {}
        for g in groups:
            out.setdefault(tuple(g[k] for k in GROUP_KEYS), []).append(g)
        return out

    old_b, new_b = buckets(old_groups), buckets(new_groups)
    pairs = []
    for key in list(old_b) + [k for k in new_b if k not in old_b]:
        olds, news = old_b.get(key, []), new_b.get(key, [])
        if len(olds) == 1 and len(news) == 1:
            pairs.append((olds[0], news[0]))
            continue
        by_lora = {g.get("lora"): g for g in news}
        for g in olds:
            partner = by_lora.pop(g.get("lora"), None)
            if partner is None:
                result.missing.append(g)
            else:
                pairs.append((g, partner))
        result.added.extend(by_lora.values())
    return pairs


def _beyond(key: str, delta: Delta, max_regression: float) -> bool:
    pct = delta.pct
    if pct is None:
        return False
    worse = -pct if key == "images_per_s" else pct  # throughput regresses down, VRAM up
    return worse > max_regression + 1e-9  # "more than PCT": exactly PCT passes


def which_run(shown: tuple) -> str:
    """"run 2", or "run 2 (the latest that made images; run 3 made none)"."""
    reported, latest = shown
    if reported is None:
        return "no run"
    if latest is not None and latest != reported:
        return f"run {reported} (the latest that made images; run {latest} made none)"
    return f"run {reported}"


def _add_notes(result: Comparison) -> None:
    old, new = result.old_run, result.new_run
    for key in ("gpu_name", "device", "dtype"):
        if old.get(key) != new.get(key):
            result.notes.append(f"{key} differs ({old.get(key)} -> {new.get(key)}): the numbers may not be comparable")
            break
    for g in result.matched:
        if g.metrics["peak_vram_bytes"].old is None and g.metrics["peak_vram_bytes"].new is not None \
                or g.metrics["peak_vram_bytes"].old is not None and g.metrics["peak_vram_bytes"].new is None:
            result.notes.append(f"{g.name}: peak VRAM measured on one side only, not compared")
        if (g.failed.new or 0) > (g.failed.old or 0):
            result.notes.append(f"{g.name}: {g.failed.new} failed image(s), was {g.failed.old or 0}")
        if not g.metrics["images_per_s"].old:
            result.notes.append(f"{g.name}: no throughput in OLD, not compared")
    if result.added or result.missing:
        result.notes.append(f"{len(result.added)} group(s) added, {len(result.missing)} missing: "
                            "not counted as regressions (did the manifest change?)")


def verdict(result: Comparison) -> str:
    """One line for a CI log or comment."""
    pct = f"{result.max_regression:g}%"
    if result.ok:
        return f"OK: no group regressed by more than {pct} ({len(result.matched)} matched, " \
               f"{len(result.added)} added, {len(result.missing)} missing)"
    worst = []
    for g in result.regressed:
        for key in g.regressions:
            label = "throughput" if key == "images_per_s" else "peak VRAM"
            worst.append(f"{g.name} {label} {g.metrics[key].pct:+.1f}%")
    return f"REGRESSION beyond {pct}: " + "; ".join(worst)


# --- output ----------------------------------------------------------------------------

def to_json(result: Comparison) -> dict:
    """The comparison as plain data (for `--format json`)."""
    def ident(g):
        return {k: g.get(k) for k in GROUP_KEYS + ("lora",)}

    def run(r, shown):
        return {**{k: r.get(k) for k in ("model", "device", "gpu_name", "dtype", "torch", "diffusers", "sdbatch",
                                          "started_at")}, "run": shown[0], "latest_run": shown[1]}

    groups = []
    for g in result.matched:
        metrics = {key: {"old": d.old, "new": d.new, "delta_pct": None if d.pct is None else round(d.pct, 3)}
                   for key, d in g.metrics.items()}
        metrics["failed"] = {"old": g.failed.old, "new": g.failed.new}
        groups.append({**ident(g.new), "status": "regression" if g.regressions else "ok",
                       "regressions": list(g.regressions), "metrics": metrics})
    return {"ok": result.ok, "max_regression_pct": result.max_regression, "verdict": verdict(result),
            "old": run(result.old_run, result.old_shown), "new": run(result.new_run, result.new_shown), "groups": groups,
            "added": [ident(g) for g in result.added], "missing": [ident(g) for g in result.missing],
            "notes": result.notes}


def to_markdown(result: Comparison, old_label: str = "OLD", new_label: str = "NEW") -> str:
    """A table and a one-line verdict, for a CI comment."""
    def side(label, run, shown):
        where = run.get("gpu_name") or run.get("device") or "?"
        number = f", {which_run(shown)}" if shown[0] is not None else ""
        return f"`{label}`: {run.get('model', '?')} on {where}, started {run.get('started_at', '?')}{number}"

    lines = ["## sdbatch compare", "", f"- old {side(old_label, result.old_run, result.old_shown)}",
             f"- new {side(new_label, result.new_run, result.new_shown)}", ""]
    if result.matched:
        lines += ["| group | " + " | ".join(label for _k, label, _up in METRICS) + " | failed | status |",
                  "|---|" + "---|" * len(METRICS) + "---|---|"]
        for g in result.matched:
            cells = [_cell(key, g.metrics[key], key in g.regressions) for key, _label, _up in METRICS]
            failed = f"{_count(g.failed.old)} → {_count(g.failed.new)}"
            status = "**regression**" if g.regressions else "ok"
            lines.append(f"| {g.name} | " + " | ".join(cells) + f" | {failed} | {status} |")
        lines.append("")
    else:
        lines += ["No group appears in both reports.", ""]
    for title, groups in (("Added (in new only)", result.added), ("Missing (in old only)", result.missing)):
        if groups:
            lines.append(f"{title}, not counted as regressions: " + ", ".join(group_name(g) for g in groups))
    for note in result.notes:
        lines.append(f"- {note}")
    lines += ["", f"**{verdict(result)}**", ""]
    return "\n".join(lines)


def _cell(key: str, delta: Delta, regressed: bool) -> str:
    fmt = _bytes if key == "peak_vram_bytes" else (lambda v: f"{v:.3g}")
    old = "-" if delta.old is None else fmt(delta.old)
    new = "-" if delta.new is None else fmt(delta.new)
    pct = "" if delta.pct is None else f" ({delta.pct:+.1f}%)"
    text = f"{old} → {new}{pct}"
    return f"**{text}**" if regressed else text


def _bytes(value: float) -> str:
    return f"{value / 2**30:.2f} GB"


def _count(value) -> str:
    return "-" if value is None else str(value)
