"""Templates and sweeps: a manifest row with `expand` or `sweep` stands for many rows.

The templates are dynamicprompts' own syntax and samplers (`{red|green}`, `{2$$a|b|c}`,
`{1-2$$a|b|c}`, `{~a|b}`, `${var=...}`, `__name__` wildcards read by its WildcardManager); this
module decides which rows come out, with which ids and seeds, and refuses what cannot be made.
Expansion is a pure function of the row, the run seed and the wildcard files' content, so every
run, resume, rank and machine gets the same rows in the same order:

- `"expand": "all"`: every combination of the `prompt` template with the `negative_prompt`
  template (prompt outer, negative inner), in dynamicprompts' combinatorial order.
- `"expand": N`: N draws, prompt then negative from one `random.Random(seed)` per row.
- Row e of an expansion is `<id>-<e>` with seed `seed + e * num_images` (so no two images share
  one), `template` / `negative_template` holding the templates.
- `"sweep": {column: [values], ...}` (up to three axes: X, Y, Z): one row per cell, `<id>-<s>` with s
  counting cells in reading order (X fastest, then Y, then Z). Every cell keeps the row's seed (a
  sweep compares like with like) unless `seed` is an axis. A `grid` column ({"id", "axes", "shape", "cell"})
  tells `grids.py` where the cell's image goes. With `expand` as well, each expanded row is swept:
  `<id>-<e>-<s>`, one grid per expanded row.

`seed` above is the row's seed, or `derive_seed(run seed, id)` for a row without one.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
from pathlib import Path

from .errors import BatchError, RowError

EXPAND_COLUMNS = ("expand", "sweep")
TEMPLATE_COLUMNS = {"prompt": "template", "negative_prompt": "negative_template"}  # column -> where its template goes
GRID_COLUMN = "grid"
WRITTEN_COLUMNS = (*TEMPLATE_COLUMNS.values(), GRID_COLUMN)
DEFAULT_MAX_ROWS = 10_000_000
MAX_AXES = 3
MAX_WILDCARD_DEPTH = 16
COUNT_CAP = 10**18  # counts saturate here: past it only "too many" matters
NOT_AN_AXIS = ("id", *EXPAND_COLUMNS, *WRITTEN_COLUMNS)


class _Refused(Exception):
    """A template that cannot be expanded: becomes a RowError on its column."""

    def __init__(self, column: str, value, allowed: str):
        super().__init__(allowed)
        self.column, self.value, self.allowed = column, value, allowed


def wants_expansion(raw: dict) -> bool:
    """True when the row has an `expand` or `sweep` cell."""
    return any(raw.get(column) not in (None, "") for column in EXPAND_COLUMNS)


def folder_digest(folder: Path | None) -> str:
    """A hash of every file under a wildcards folder (names and bytes): a resume trusts the last run's
    expansion only if the wildcard files are unchanged."""
    if folder is None:
        return ""
    digest = hashlib.sha256()
    root = Path(folder)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode("utf-8", "surrogateescape") + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


class Expander:
    """Expands rows for one manifest; holds dynamicprompts' WildcardManager (each file read once)."""

    def __init__(self, wildcards: Path | None = None, max_rows: int = DEFAULT_MAX_ROWS):
        if wildcards is not None and not Path(wildcards).is_dir():
            raise BatchError(f"--wildcards {wildcards}: not a folder (it holds name.txt files, one entry a line)")
        if max_rows < 1:
            raise BatchError(f"--max-rows must be >= 1, got {max_rows}")
        self.folder = Path(wildcards).resolve() if wildcards is not None else None
        self.max_rows = max_rows
        self._wildcards = None

    @property
    def wildcards(self):
        """dynamicprompts' WildcardManager over the folder (made on first use: most manifests expand nothing).
        It sorts and de-duplicates each file's entries: a stable order."""
        if self._wildcards is None:
            from dynamicprompts.wildcards import WildcardManager

            self._wildcards = WildcardManager(self.folder)
        return self._wildcards

    # --- one row ---------------------------------------------------------------------------------

    def expand(self, line: int, raw: dict, job_id: str, seed: int,
               images_per_row: int = 1) -> tuple[list[dict], list[RowError]]:
        """The rows `raw` stands for (its own line number applies to each), or what is wrong with it.

        `seed` is the row's seed (its own, or the one derived for its id); `images_per_row` its num_images.
        """
        try:
            how = _expand_value(raw.get("expand"))
            templates = {c for c in TEMPLATE_COLUMNS if how is not None and raw.get(c) not in (None, "")}
            axes = _sweep_axes(raw.get("sweep"), templates)
            written = (list(TEMPLATE_COLUMNS.values()) if how is not None else []) + ([GRID_COLUMN] if axes else [])
            for column in written:
                if raw.get(column) not in (None, ""):
                    raise _Refused(column, raw[column], f"'{column}' is written by "
                                   f"{'sweep' if column == GRID_COLUMN else 'expand'}: rename this column")
            cells = math.prod(len(values) for _, values in axes) if axes else 1
            if cells > self.max_rows:
                raise _Refused("sweep", raw.get("sweep"), f"{cells:,} cells, over --max-rows {self.max_rows:,}")
            base = {k: v for k, v in raw.items() if k not in EXPAND_COLUMNS}
            if how is None:
                rows = [dict(base, seed=seed)]
                ids = [job_id]
            else:
                try:
                    pairs = self._prompts(raw, how, seed, cells)
                except _Refused:
                    raise
                except Exception as e:  # dynamicprompts refusing the template while sampling (undefined variable, ...)
                    column = "prompt" if raw.get("prompt") not in (None, "") else "negative_prompt"
                    raise _Refused(column, raw.get(column), f"the template cannot be expanded: {type(e).__name__}: "
                                                            f"{str(e).splitlines()[0][:120] if str(e) else ''}") from None
                rows, ids = [], []
                for e, (prompt, negative) in enumerate(pairs):
                    row = dict(base, id=f"{job_id}-{e}", seed=seed + e * images_per_row)
                    for column, text in (("prompt", prompt), ("negative_prompt", negative)):
                        if text is not None:
                            row[column] = text
                            row[TEMPLATE_COLUMNS[column]] = _text(raw, column)
                    rows.append(row)
                    ids.append(row["id"])
            if axes:
                rows = [cell for row, grid_id in zip(rows, ids) for cell in _sweep(row, grid_id, axes)]
            return rows, []
        except _Refused as e:
            return [], [RowError(line, e.column, e.value, e.allowed)]

    # --- templates -------------------------------------------------------------------------------

    def _prompts(self, raw: dict, how, seed: int, cells: int) -> list[tuple[str | None, str | None]]:
        """(prompt, negative) pairs: every combination ("all") or N seeded draws; refused when they times
        the sweep's `cells` would pass max_rows."""
        from dynamicprompts.enums import SamplingMethod

        templates = {column: self._parse(raw, column) for column in TEMPLATE_COLUMNS}
        if templates["prompt"] is None and templates["negative_prompt"] is None:
            raise _Refused("expand", raw.get("expand"), "expand needs a prompt or negative_prompt template")
        for column, command in templates.items():
            if command is not None:
                self._check_wildcards(command, column, _text(raw, column), [])
        limit = self.max_rows // cells
        if how != "all":
            if how > limit:
                raise _Refused("expand", raw.get("expand"), f"{_rows_text(how * cells, {'draw': how}, cells)}, over "
                                                            f"--max-rows {self.max_rows:,}")
            shared = random.Random(seed)  # one stream per row, prompt then negative: stable on any machine
            streams = [iter(self._context(SamplingMethod.RANDOM, shared).sample_prompts(command))
                       if command is not None else itertools.repeat(None) for command in templates.values()]
            try:
                return [(_str(next(streams[0])), _str(next(streams[1]))) for _ in range(how)]
            except StopIteration:  # an empty variant: the sampler has nothing to draw
                raise _Refused("expand", raw.get("expand"), "the template yields no prompt") from None
        counts = [self._count(command) if command is not None else 1 for command in templates.values()]
        total = _saturating_mul(_saturating_mul(*counts, cap=COUNT_CAP), cells, cap=COUNT_CAP)
        if total > self.max_rows:  # counted from the templates' structure: refused without enumerating
            shown = {column: n for (column, command), n in zip(templates.items(), counts) if command is not None}
            raise _Refused("expand", raw.get("expand"), f"{_rows_text(total, shown, cells)}, over "
                                                        f"--max-rows {self.max_rows:,}")
        lists = {}
        for column, command in templates.items():
            if command is None:
                lists[column] = [None]
                continue
            room = limit // max(1, len(lists.get("prompt", [None])))
            context = self._context(SamplingMethod.COMBINATORIAL, random.Random(seed))
            values = [str(p) for p in itertools.islice(context.sample_prompts(command), room + 1)]
            if len(values) > room:  # a structure the count does not model (variables): the enumeration decides
                raise _Refused("expand", raw.get("expand"), f"more than {self.max_rows:,} rows, over "
                                                            f"--max-rows {self.max_rows:,}")
            if not values:
                raise _Refused(column, _text(raw, column), "the template yields no prompt")
            lists[column] = values
        return list(itertools.product(lists["prompt"], lists["negative_prompt"]))

    def _parse(self, raw: dict, column: str):
        from dynamicprompts.parser.parse import parse

        value = raw.get(column)
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if isinstance(value, (dict, list, bool)) or (isinstance(value, float) and not math.isfinite(value)):
            raise _Refused(column, value, "must be text (a dynamicprompts template)")
        try:
            return parse(str(value))
        except Exception as e:  # pyparsing's ParseException and friends: the template is malformed
            raise _Refused(column, value, f"not a valid template: {str(e).splitlines()[0][:120]}") from None

    def _context(self, method, rand: random.Random):
        from dynamicprompts.sampling_context import SamplingContext

        return SamplingContext(default_sampling_method=method, wildcard_manager=self.wildcards, rand=rand)

    def _wildcard_name(self, command) -> str:
        from dynamicprompts.commands import Command
        from dynamicprompts.enums import SamplingMethod

        if isinstance(command.wildcard, Command):  # `__{a|b}__`: dynamicprompts takes the first name it samples
            context = self._context(SamplingMethod.COMBINATORIAL, random.Random(0))
            return next(iter(context.sample_prompts(command.wildcard, 1))).text
        return command.wildcard

    def _values(self, command) -> list[str]:
        return list(self.wildcards.get_values(self._wildcard_name(command)).iterate_string_values_weighted())

    def _check_wildcards(self, command, column: str, template: str, stack: list[str]) -> None:
        """Every `__name__` the template can reach names a file with entries (dynamicprompts would
        otherwise print the name itself, or loop for ever in combinatorial mode)."""
        from dynamicprompts.commands import WildcardCommand
        from dynamicprompts.parser.parse import parse

        if isinstance(command, WildcardCommand):
            name = self._wildcard_name(command)
            if name in stack or len(stack) >= MAX_WILDCARD_DEPTH:
                raise _Refused(column, template, f"wildcard __{name}__ refers to itself "
                                                 f"({' -> '.join(f'__{n}__' for n in stack + [name])})")
            values = self._values(command)
            if not values:
                where = (f"no {name}.txt (or other wildcard file) with entries in {self.folder}" if self.folder
                         else "no --wildcards DIR given (the folder of name.txt files)")
                raise _Refused(column, template, f"wildcard __{name}__ not found: {where}")
            for value in values:
                try:
                    self._check_wildcards(parse(value), column, template, stack + [name])
                except _Refused:
                    raise
                except Exception as e:
                    raise _Refused(column, template, f"wildcard __{name}__ holds a bad template {value!r}: "
                                                     f"{str(e).splitlines()[0][:80]}") from None
        for child in _children(command):
            self._check_wildcards(child, column, template, stack)

    def _count(self, command, variables: dict | None = None) -> int:
        """How many prompts the combinatorial sampler yields (at most COUNT_CAP).

        Walks dynamicprompts' parsed commands as its CombinatorialSampler does: a sequence multiplies,
        a variant of k of n options adds k! * e_k(option counts) over its k range (ordered picks of
        distinct options), a wildcard adds its values' counts. Different options yielding the same
        text are counted twice (dynamicprompts drops such duplicates), so this is an upper bound.
        """
        from dynamicprompts.commands import (LiteralCommand, SequenceCommand, VariantCommand, WildcardCommand,
                                             WrapCommand)
        from dynamicprompts.commands.variable_commands import VariableAccessCommand, VariableAssignmentCommand
        from dynamicprompts.parser.parse import parse

        cap = COUNT_CAP
        variables = variables or {}
        method = getattr(command, "sampling_method", None)
        if method is not None and method.is_nonfinite():  # `{~a|b}`: one draw per combination
            return 1
        if isinstance(command, LiteralCommand):
            return 1
        if isinstance(command, SequenceCommand):
            total, scope = 1, dict(variables)
            for token in command.tokens:
                if isinstance(token, VariableAssignmentCommand):
                    scope[token.name] = 1 if token.immediate else self._count(token.value, scope)
                else:
                    total = _saturating_mul(total, self._count(token, scope), cap=cap)
            return total
        if isinstance(command, VariableAssignmentCommand):
            return 1
        if isinstance(command, VariableAccessCommand):
            if command.name in variables:
                return variables[command.name]
            return self._count(command.default, variables) if command.default is not None else 1
        if isinstance(command, VariantCommand):
            values = _distinct(command.values)  # equal options give equal text: counted once
            if len(values) == 1 and isinstance(values[0], WildcardCommand):
                counts = [self._count(parse(v), variables) for v in dict.fromkeys(self._values(values[0]))]
            else:
                counts = [self._count(v, variables) for v in values]
            low, high = min(command.min_bound, len(counts)), min(command.max_bound, len(counts))
            return _ordered_picks(counts, low, high, cap)
        if isinstance(command, WildcardCommand):
            total = 0
            for value in self._values(command):
                total = min(cap, total + self._count(parse(value), variables))
            return total
        if isinstance(command, WrapCommand):
            return _saturating_mul(self._count(command.wrapper, variables), self._count(command.inner, variables),
                                   cap=cap)
        return 1  # a command this walk does not model: the bounded enumeration decides


# --- helpers ---------------------------------------------------------------------------------------

def _children(command) -> list:
    from dynamicprompts.commands import Command, SequenceCommand, VariantCommand, WildcardCommand, WrapCommand
    from dynamicprompts.commands.variable_commands import VariableAccessCommand, VariableAssignmentCommand

    if isinstance(command, SequenceCommand):
        return list(command.tokens)
    if isinstance(command, VariantCommand):
        return list(command.values)
    if isinstance(command, WrapCommand):
        return [command.wrapper, command.inner]
    if isinstance(command, VariableAssignmentCommand):
        return [command.value]
    if isinstance(command, VariableAccessCommand):
        return [command.default] if command.default is not None else []
    if isinstance(command, WildcardCommand):
        return ([command.wildcard] if isinstance(command.wildcard, Command) else []) + list(command.variables.values())
    return []


def _distinct(values: list) -> list:
    """Values without repeats, in order (commands holding dicts cannot be hashed: compared one by one)."""
    try:
        return list(dict.fromkeys(values))
    except TypeError:
        kept = []
        for value in values:
            if value not in kept:
                kept.append(value)
        return kept


def _expand_value(value):
    """None (no templates), "all", or N >= 1."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    allowed = "'all' (every combination) or an integer N >= 1 (N random draws)"
    if isinstance(value, str):
        text = value.strip()
        if text.lower() == "all":
            return "all"
        try:
            value = float(text) if any(c in text for c in ".eE") else int(text)
        except ValueError:
            raise _Refused("expand", value, allowed) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Refused("expand", value, allowed)
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise _Refused("expand", value, allowed)
    if int(value) < 1:
        raise _Refused("expand", value, allowed)
    return int(value)


def _sweep_axes(value, templates: set[str]) -> list[tuple[str, list]]:
    """[(column, values), ...] in the order written: X, Y, Z; `templates`: the columns expand fills."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    allowed = 'an object of column -> list of values, up to 3 columns, e.g. {"cfg": [4, 7.5], "steps": [10, 20]}'
    if isinstance(value, str):  # a CSV cell
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError, ValueError):
            raise _Refused("sweep", value, f"not valid JSON: {allowed}") from None
    if not isinstance(value, dict) or not value:
        raise _Refused("sweep", value, allowed)
    if len(value) > MAX_AXES:
        raise _Refused("sweep", value, f"{len(value)} axes: at most {MAX_AXES} (X, Y, Z)")
    axes = []
    for column, values in value.items():
        if column in NOT_AN_AXIS:
            raise _Refused("sweep", value, f"'{column}' cannot be a sweep axis")
        if column in templates:
            raise _Refused("sweep", value, f"'{column}' is a template here (expand): put its alternatives in "
                                           "the template instead")
        if not isinstance(values, list) or not values:
            raise _Refused("sweep", value, f"axis '{column}' must be a non-empty list of values")
        axes.append((str(column), values))
    return axes


def _sweep(row: dict, grid_id: str, axes: list[tuple[str, list]]) -> list[dict]:
    """One row per cell of the grid, in reading order: X fastest, then Y, then Z."""
    names = [name for name, _ in axes]
    sizes = [len(values) for _, values in axes]
    cells = []
    for s, index in enumerate(itertools.product(*(range(n) for n in reversed(sizes)))):
        index = tuple(reversed(index))  # (x, y, z)
        cell = dict(row, id=f"{grid_id}-{s}")
        cell.update({name: values[i] for (name, values), i in zip(axes, index)})
        cell[GRID_COLUMN] = {"id": grid_id, "axes": names, "shape": sizes, "cell": list(index)}
        cells.append(cell)
    return cells


def _text(raw: dict, column: str) -> str | None:
    value = raw.get(column)
    return None if value is None else str(value)


def _str(result) -> str | None:
    return None if result is None else str(result)


def _rows_text(total: int, counts: dict[str, int], cells: int) -> str:
    """'1,048,576 rows (1,048,576 prompts x 1 sweep cell)': what a refusal names."""
    def number(n: int) -> str:
        return f"{n:,}" if n < COUNT_CAP else "more than 10^18"

    names = {"prompt": "prompts", "negative_prompt": "negative prompts", "draw": "draws"}
    parts = [f"{number(n)} {names[column]}" for column, n in counts.items()]
    parts.append(f"{cells:,} sweep cell{'s' if cells != 1 else ''}")
    return f"{number(total)} rows ({' x '.join(parts)})"


def _saturating_mul(a: int, b: int, cap: int) -> int:
    return min(cap, a * b) if a < cap and b < cap else (0 if 0 in (a, b) else cap)


def _ordered_picks(counts: list[int], low: int, high: int, cap: int) -> int:
    """Sum over k in [low, high] of k! * e_k(counts): ordered choices of k distinct options, each
    contributing its own count (saturating at cap: only "over the limit or not" matters then)."""
    n = len(counts)
    if high < 1:
        return 1 if low <= 0 else 0  # `{0$$a|b}` yields one empty prompt
    if math.perm(n, high) >= cap and all(counts):  # quick: at least that many ordered picks
        return cap
    elementary = [1] + [0] * high  # e_0..e_high
    for c in counts:
        for k in range(high, 0, -1):
            elementary[k] = min(cap, elementary[k] + elementary[k - 1] * c)
    total = 1 if low <= 0 else 0
    for k in range(max(low, 1), high + 1):
        total = min(cap, total + math.factorial(k) * elementary[k])
    return total
