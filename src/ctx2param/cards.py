"""Model cards for trained generators and generated adapters, rendered from the Jinja templates in
``model_cards/``.

The card's YAML metadata is built with ``huggingface_hub.ModelCardData`` (so the Hub reads the base model,
library, licence, datasets and evaluation results from it); the body comes from
``model_cards/generator_card.md.jinja`` or ``model_cards/adapter_card.md.jinja``. What a card says about
training and evaluation is collected in a :class:`CardData` that the trainer and the evaluation runner fill
(sentence-transformers keeps its ``model_card_data`` the same way); ``ctx2param.hub.get_card_data(model)``
returns the one attached to a model.

This module sits low in the package: it imports only ``huggingface_hub``, ``jinja2`` and ctx2param's adapter
types (a generator's config is read by duck typing, a mapping or an object with ``to_dict()``). The import
goes one way: ``adapter.py`` does not import this module; ``ContextAdapter.push_to_hub`` renders its card
through :func:`ctx2param.adapter.register_card_renderer`, which this module calls when it is imported.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import jinja2
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .adapter import ContextAdapter, register_card_renderer
from .environment import DEFAULT_PACKAGES, library_versions
from .errors import Ctx2ParamError
from .file_utils import write_text_atomically

__all__ = [
    "CITATIONS",
    "CardData",
    "CardTemplateError",
    "EvalEntry",
    "GENERATOR_TEMPLATE",
    "ADAPTER_TEMPLATE",
    "find_template",
    "framework_versions",
    "is_hub_model_id",
    "render_adapter_card",
    "render_generator_card",
    "template_dirs",
]

GENERATOR_TEMPLATE = "generator_card.md.jinja"
ADAPTER_TEMPLATE = "adapter_card.md.jinja"
TEMPLATES_ENV = "CTX2PARAM_MODEL_CARDS"
LIBRARY_NAME = "ctx2param"
CARD_DATA_SCHEMA_VERSION = 2  # 2: framework_versions

#: BibTeX of the two methods ctx2param implements; every card cites both (the card's own method first).
CITATIONS: dict[str, str] = {
    "compas": """@article{jukic2025compas,
  title   = {Context Parametrization with Compositional Adapters},
  author  = {Juki{\\'c}, Josip and Tutek, Martin and {\\v{S}}najder, Jan},
  journal = {arXiv preprint arXiv:2509.22158},
  year    = {2025},
  doi     = {10.48550/arXiv.2509.22158},
  url     = {https://arxiv.org/abs/2509.22158}
}""",
    "stream_adapter": """@article{muhtar2024streamadapter,
  title   = {StreamAdapter: Efficient Test Time Adaptation from Contextual Streams},
  author  = {Muhtar, Dilxat and Shen, Yelong and Yang, Yaming and Liu, Xiaodong and Lu, Yadong and
             Liu, Jianfeng and Zhan, Yuefeng and Sun, Hao and Deng, Weiwei and Sun, Feng and
             Zhang, Xueliang and Gao, Jianfeng and Chen, Weizhu and Zhang, Qi},
  journal = {arXiv preprint arXiv:2411.09289},
  year    = {2024},
  doi     = {10.48550/arXiv.2411.09289},
  url     = {https://arxiv.org/abs/2411.09289}
}""",
}

# What each method's generator does, in a few sentences (the card's "Model description").
_METHOD_INFO: dict[str, dict[str, str]] = {
    "compas": {
        "title": "CompAs",
        "paper": "https://arxiv.org/abs/2509.22158",
        "description": (
            "A CompAs generator (Context Parametrization with Compositional Adapters, Jukić, Tutek and "
            "Šnajder, 2025) reads a piece of context (an instruction, a few demonstrations, a passage) "
            "through the frozen base model and maps it to a low-rank update of the base model's weights. "
            "It is trained so that the base model with the *sum* of the adapters of several chunks "
            "answers like the base model with all the chunks in its prompt (student-teacher alignment), "
            "so that adapters of separate chunks add up (an additivity term), and so that a decoder can "
            "read the context back out of an adapter (reconstruction)."
        ),
    },
    "stream_adapter": {
        "title": "StreamAdapter",
        "paper": "https://arxiv.org/abs/2411.09289",
        "description": (
            "A StreamAdapter generator (Muhtar et al., 2024) maps context to parameters as it streams in: "
            "per layer, learned queries cross-attend to each chunk's key/value states and a gated "
            "recurrence folds the chunk summaries into a fixed-size state, which is absorbed into a "
            "low-rank update of the layer's weights. Inference then costs the same whatever the number of "
            "demonstrations or passages that were absorbed."
        ),
    },
}

_DATASET_KEYS = ("name", "id", "num_examples", "license", "description")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")


class CardTemplateError(Ctx2ParamError, FileNotFoundError):
    """A model-card template is missing (neither in the source tree's ``model_cards/`` nor installed)."""


def is_hub_model_id(name: str | None) -> bool:
    """True when ``name`` looks like a Hub model id (``org/name`` or ``name``) and is not a local path."""
    if not name or not isinstance(name, str):
        return False
    if name.startswith((".", "/", "~")) or "\\" in name or "--" in name or ".." in name:
        return False
    return bool(_HUB_ID_RE.match(name)) and not os.path.exists(name)


# ------------------------------------------------------------------------------------------- card data
@dataclass
class EvalEntry:
    """One evaluation number for a card: a row of its results table and, for the card's own system, an
    entry of the Hub's ``model-index``.

    Attributes:
        task: task name as the project reports it (``"SQuAD-k"``, ``"ARC-Challenge"``, ``"MMLU"``).
        metric: metric id (``"exact_match"``, ``"f1"``, ``"accuracy"``).
        value: the number (EM/F1 in 0-100, accuracy in 0-1 or 0-100 as the runner reports it).
        dataset_id: Hub dataset id (``"rajpurkar/squad"``) when there is one.
        dataset_name: readable dataset name (defaults to ``task``).
        split: dataset split evaluated on.
        k: number of passages / demonstrations.
        n: number of evaluated examples.
        system: ``None`` for the card's own generator, else a baseline (``"icl"``, ``"closed_book"``);
            baselines appear in the table only.
        task_type: Hub task type of the ``model-index`` entry.
        seed: seed of the sampled distractors / demonstrations.
    """

    task: str
    metric: str
    value: float
    dataset_id: str | None = None
    dataset_name: str | None = None
    split: str | None = None
    k: int | None = None
    n: int | None = None
    system: str | None = None
    task_type: str = "question-answering"
    seed: int | None = None


@dataclass
class CardData:
    """What a generator's model card says beyond its config: training data and settings, losses, results.

    Training fills ``datasets``, ``hyperparameters`` and ``losses`` (and ``training_time_s``, ``hardware``);
    evaluation fills ``eval_results`` (:meth:`add_result`). Kept on a model as ``model.card_data`` (see
    ``ctx2param.hub.get_card_data``) and saved beside a published generator as ``card_data.json``.

    Attributes:
        model_name: display name (defaults to the repository name).
        base_model: Hub id of the base model for the card's metadata (defaults to the config's base when
            that is a Hub id; a local folder is not valid Hub metadata).
        license: licence of the generator's weights (Hub licence id).
        language: languages of the training data.
        datasets: training data: ``{"name", "id" (Hub dataset id), "num_examples", "license",
            "description"}`` (only ``name`` is required).
        hyperparameters: training settings (learning rate, steps, batch size, loss weights, ...).
        losses: logged training losses, rows like ``{"step": 100, "loss": 1.2, "alignment": 0.9}``.
        eval_results: :class:`EvalEntry` rows.
        training_time_s: wall-clock training time.
        hardware: what it was trained on (``"1x H100 80GB"``).
        framework_versions: the library versions of the training run (the trainer fills them); the card
            shows them, or the rendering machine's when they are missing.
        tags: extra Hub tags.
        description: replaces the method's standard description in the card.
        notes: extra Markdown appended to the card (limitations, intended use).
    """

    model_name: str | None = None
    base_model: str | None = None
    license: str = "apache-2.0"
    language: list[str] = field(default_factory=lambda: ["en"])
    datasets: list[dict[str, Any]] = field(default_factory=list)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    losses: list[dict[str, float]] = field(default_factory=list)
    eval_results: list[EvalEntry] = field(default_factory=list)
    training_time_s: float | None = None
    hardware: str | None = None
    framework_versions: dict[str, str] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    description: str | None = None
    notes: str | None = None

    # ---------------------------------------------------------------------------------- filling
    def add_dataset(
        self,
        name: str,
        id: str | None = None,  # noqa: A002 - the Hub's word for it
        num_examples: int | None = None,
        license: str | None = None,  # noqa: A002
        description: str | None = None,
    ) -> None:
        """Record one training data set (replacing an earlier entry of the same name)."""
        entry = {"name": name, "id": id, "num_examples": num_examples, "license": license}
        entry["description"] = description
        entry = {k: v for k, v in entry.items() if v is not None}
        self.datasets = [d for d in self.datasets if d.get("name") != name] + [entry]

    def add_datasets(self, entries: Iterable[str | Mapping[str, Any]]) -> None:
        """Record several data sets: names, or :meth:`add_dataset` arguments as dicts
        (``{"name": "CoQA", "id": "stanfordnlp/coqa", "num_examples": 7983, "license": "..."}``)."""
        for entry in entries:
            if isinstance(entry, str):
                self.add_dataset(entry)
            elif isinstance(entry, Mapping):
                self.add_dataset(**entry)
            else:
                raise TypeError(f"datasets entries are names or dicts, got {type(entry).__name__}.")

    def add_hyperparameters(self, **values: Any) -> None:
        """Record training settings (JSON-serialisable values; later calls update earlier ones)."""
        json.dumps(values)  # fail early, with the offending value in the message
        self.hyperparameters.update(values)

    def log_losses(self, step: int, **losses: float) -> None:
        """Record one row of training losses (``loss`` the total, other keys the components)."""
        self.losses.append({"step": int(step), **{k: float(v) for k, v in losses.items()}})

    def add_result(self, task: str, metric: str, value: float, **details: Any) -> EvalEntry:
        """Record one evaluation number; ``details`` are :class:`EvalEntry` fields (``k``, ``n``, ...)."""
        entry = EvalEntry(task=task, metric=metric, value=float(value), **details)
        self.eval_results.append(entry)
        return entry

    # ------------------------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (with a schema version) that :meth:`from_dict` reads back."""
        return {"schema_version": CARD_DATA_SCHEMA_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CardData:
        """Inverse of :meth:`to_dict`; unknown keys are an error (they would vanish from the card)."""
        data = dict(data)
        version = data.pop("schema_version", CARD_DATA_SCHEMA_VERSION)
        if not isinstance(version, int) or version > CARD_DATA_SCHEMA_VERSION:
            raise ValueError(
                f"Card data of schema version {version!r} is newer than this ctx2param reads "
                f"({CARD_DATA_SCHEMA_VERSION}); upgrade ctx2param."
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown card data fields {unknown}; known fields: {sorted(known)}.")
        results = []
        for row in data.pop("eval_results", None) or []:
            results.append(row if isinstance(row, EvalEntry) else EvalEntry(**row))
        return cls(**data, eval_results=results)

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dict` as JSON to ``path`` (through a temporary file, then a rename)."""
        return write_text_atomically(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> CardData:
        """Read a file written by :meth:`save`."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"Cannot read card data from {path}: {err}") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object of card data.")
        return cls.from_dict(data)

    # --------------------------------------------------------------------------------- metadata
    def metric_names(self) -> list[str]:
        return list(dict.fromkeys(e.metric for e in self.eval_results))

    def dataset_ids(self) -> list[str]:
        return [d["id"] for d in self.datasets if d.get("id")]


# ------------------------------------------------------------------------------------------- templates
def template_dirs() -> list[Path]:
    """Folders searched for card templates, in order: ``$CTX2PARAM_MODEL_CARDS``, the source tree's
    top-level ``model_cards/``, and a copy installed inside the package (``ctx2param/model_cards/``)."""
    here = Path(__file__).resolve().parent
    dirs = []
    if os.environ.get(TEMPLATES_ENV):
        dirs.append(Path(os.environ[TEMPLATES_ENV]).expanduser())
    dirs += [here.parent.parent / "model_cards", here / "model_cards"]
    return dirs


def find_template(name: str) -> Path:
    """The path of template ``name``; raises :class:`CardTemplateError` listing where it looked."""
    searched = template_dirs()
    for folder in searched:
        if (folder / name).is_file():
            return folder / name
    raise CardTemplateError(
        f"The model-card template {name!r} was not found; looked in "
        f"{', '.join(str(d) for d in searched)}. Reinstall ctx2param, run from a source checkout, or point "
        f"${TEMPLATES_ENV} at a folder holding {GENERATOR_TEMPLATE} and {ADAPTER_TEMPLATE}."
    )


def _render(template_name: str, card_data: ModelCardData, **context: Any) -> str:
    path = find_template(template_name)
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(path.parent)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    try:
        text = env.get_template(path.name).render(card_data=card_data.to_yaml(), **context)
    except jinja2.TemplateError as err:
        raise CardTemplateError(f"Cannot render the model-card template {path}: {err}") from err
    text = re.sub(r"\n{3,}", "\n\n", text).rstrip() + "\n"
    ModelCard(text)  # parses the front matter: a template that breaks the YAML fails here, not on the Hub
    return text


def framework_versions() -> dict[str, str]:
    """Versions of Python and of the installed libraries a generator depends on, in this environment."""
    return {name: version for name, version in library_versions(DEFAULT_PACKAGES).items() if version}


def _citations(method: str | None) -> list[str]:
    first = [method] if method in CITATIONS else []
    return [CITATIONS[m] for m in first + [m for m in CITATIONS if m not in first]]


def _config_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        return dict(to_dict())
    raise TypeError(f"Expected a generator config (or its dict), got {type(config).__name__}.")


def _method_name(config: Mapping[str, Any]) -> str:
    method = config.get("method")
    if not method:
        model_type = str(config.get("model_type") or "")
        method = model_type.removeprefix("ctx2param_") or "unknown"
    return str(method)


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def _loss_rows(
    losses: Sequence[Mapping[str, float]], max_rows: int = 12
) -> tuple[list[str], list[list[str]]]:
    """Columns and at most ``max_rows`` evenly spaced rows (always the first and the last) of the losses."""
    if not losses:
        return [], []
    columns = list(dict.fromkeys(k for row in losses for k in row))
    if len(losses) <= max_rows:
        picked = list(losses)
    else:
        idx = sorted({round(i * (len(losses) - 1) / (max_rows - 1)) for i in range(max_rows)})
        picked = [losses[i] for i in idx]
    rows = [[_fmt_value(row[c]) if c in row else "" for c in columns] for row in picked]
    return columns, rows


def render_generator_card(
    config: Any,
    card_data: CardData | None = None,
    *,
    repo_id: str | None = None,
    num_parameters: int | None = None,
    size_bytes: int | None = None,
) -> str:
    """The README.md of a generator repository.

    Args:
        config: the generator's config (a ``ContextAdaptationConfig`` or its ``config.json`` dict).
        card_data: training and evaluation details (empty when ``None``).
        repo_id: the repository the card is for (used in the usage example and as the default name).
        num_parameters: number of the method's own parameters (not counting the base model).
        size_bytes: size of the method's weight files.
    """
    cfg = _config_dict(config)
    data = card_data if card_data is not None else CardData()
    method = _method_name(cfg)
    info = _METHOD_INFO.get(method, {})
    base = cfg.get("base_model_name_or_path")
    base_id = data.base_model or (base if is_hub_model_id(base) else None)
    model_name = data.model_name or (repo_id.split("/")[-1] if repo_id else f"ctx2param-{method}")
    own_results = [e for e in data.eval_results if e.system in (None, method)]
    eval_results = [
        EvalResult(
            task_type=e.task_type,
            dataset_type=e.dataset_id or re.sub(r"[^a-z0-9_-]+", "-", e.task.lower()),
            dataset_name=e.dataset_name or (e.task if e.k is None else f"{e.task} (k={e.k})"),
            dataset_split=e.split,
            metric_type=e.metric,
            metric_value=e.value,
            task_name=e.task,
        )
        for e in own_results
    ]
    metadata = ModelCardData(
        library_name=LIBRARY_NAME,
        base_model=base_id,
        license=data.license,
        language=data.language or None,
        datasets=data.dataset_ids() or None,
        metrics=data.metric_names() or None,
        pipeline_tag="text-generation",
        tags=list(
            dict.fromkeys([LIBRARY_NAME, method, "context-adaptation", "lora", "hypernetwork", *data.tags])
        ),
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
    )
    target_shapes = cfg.get("target_shapes") or {}
    loss_columns, loss_rows = _loss_rows(data.losses)
    return _render(
        GENERATOR_TEMPLATE,
        metadata,
        model_name=model_name,
        repo_id=repo_id or f"<your-org>/{model_name}",
        method=method,
        method_title=info.get("title", method),
        method_paper=info.get("paper"),
        description=data.description
        or info.get("description")
        or f"A ctx2param generator of the {method!r} method: it turns context into a low-rank update of "
        "the base model's weights.",
        base_model=base,
        base_model_id=base_id,
        base_revision=cfg.get("base_model_revision"),
        model_type=cfg.get("model_type"),
        target_modules=list(cfg.get("target_modules") or []),
        num_target_layers=len(target_shapes),
        rank=cfg.get("rank"),
        scale=cfg.get("scale"),
        chunk_tokens=cfg.get("chunk_tokens"),
        num_parameters=num_parameters,
        size_mb=None if size_bytes is None else size_bytes / 1e6,
        datasets=[{k: d.get(k) for k in _DATASET_KEYS} for d in data.datasets],
        hyperparameters={k: _fmt_value(v) for k, v in data.hyperparameters.items()},
        loss_columns=loss_columns,
        loss_rows=loss_rows,
        eval_results=[
            {**asdict(e), "value": _fmt_value(e.value), "system": e.system or method}
            for e in data.eval_results
        ],
        training_time_h=None if data.training_time_s is None else data.training_time_s / 3600,
        hardware=data.hardware,
        notes=data.notes,
        citations=_citations(method),
        versions=data.framework_versions or framework_versions(),
        versions_of="the training run" if data.framework_versions else "the machine that wrote this card",
    )


_ADAPTER_CARD_KEYS = (
    "repo_id",
    "model_name",
    "base_model",
    "generator",
    "context_summary",
    "description",
    "license",
    "language",
    "datasets",
    "tags",
    "method",
)


def render_adapter_card(adapter: ContextAdapter, **card_data: Any) -> str:
    """The README.md of a generated adapter published as a PEFT LoRA repository.

    The metadata names the base model (``base_model`` and the tag ``base_model:adapter:<base>``, as the Hub
    expects of adapters) with ``library_name: peft``.

    Args:
        adapter: the adapter (single, not batched).
        **card_data: optional ``repo_id``, ``model_name``, ``base_model`` (a Hub id, when the adapter names a
            local folder), ``generator`` (id of the generator that made it), ``method``, ``context_summary``
            (what context it encodes), ``description``, ``license``, ``language``, ``datasets``, ``tags``.
    """
    unknown = sorted(set(card_data) - set(_ADAPTER_CARD_KEYS))
    if unknown:
        raise TypeError(f"Unknown adapter card fields {unknown}; known: {list(_ADAPTER_CARD_KEYS)}.")
    if not isinstance(adapter, ContextAdapter):
        raise TypeError(f"render_adapter_card needs a ContextAdapter, got {type(adapter).__name__}.")
    repo_id = card_data.get("repo_id")
    base = card_data.get("base_model") or adapter.base_model
    base_id = base if is_hub_model_id(base) else None
    method = card_data.get("method") or adapter.metadata.get("method")
    tags = [LIBRARY_NAME, "lora", "peft", "context-adaptation"]
    if base_id:
        tags.append(f"base_model:adapter:{base_id}")
    tags += list(card_data.get("tags") or [])
    datasets = card_data.get("datasets")
    metadata = ModelCardData(
        library_name="peft",
        base_model=base_id,
        license=card_data.get("license", "apache-2.0"),
        language=card_data.get("language"),
        datasets=list(datasets) if datasets else None,
        pipeline_tag="text-generation",
        tags=list(dict.fromkeys(tags)),
    )
    model_name = card_data.get("model_name") or (repo_id.split("/")[-1] if repo_id else "context-adapter")
    modules = list(adapter)
    suffixes = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in modules))
    return _render(
        ADAPTER_TEMPLATE,
        metadata,
        model_name=model_name,
        repo_id=repo_id or f"<your-org>/{model_name}",
        base_model=base,
        base_model_id=base_id,
        base_revision=adapter.base_revision,
        generator=card_data.get("generator"),
        method=method,
        context_summary=card_data.get("context_summary"),
        description=card_data.get("description"),
        num_modules=len(modules),
        module_suffixes=suffixes,
        rank=adapter.rank,
        num_parameters=adapter.num_parameters(),
        dtype=str(adapter.dtype).removeprefix("torch."),
        adapter_metadata={k: _fmt_value(v) for k, v in adapter.metadata.items()},
        citations=_citations(method),
        versions=framework_versions(),
    )


# ``ContextAdapter.push_to_hub`` renders its card with this (adapter.py never imports this module).
register_card_renderer(render_adapter_card)
