"""Training data: JSONL chat rows -> token ids with loss only on assistant tokens -> deterministic micro-batches.

Rows come as chat messages from cogumi.train.rows (JSONL, JSON, parquet, CSV or a hub id; messages, prompt/response,
ShareGPT or Alpaca shapes). The model's own chat template formats them.
Labels are -100 everywhere except the tokens of each assistant turn, its end-of-turn token included, so the model
learns to stop.

Packing (the default) puts several whole examples into one row of up to data.max_seq_len tokens. Attention must
never cross examples: every example restarts its position_ids, and cogumi.train.packed_attention turns them into
segment boundaries for a variable-length attention kernel (transformers 4.43.3 ignores them). An optimizer step
then takes micro_batch_size x grad_accum packed rows, not examples: fewer, fuller steps per epoch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from cogumi.core.config import DataConfig
from cogumi.core.errors import UserError
from cogumi.train.rows import ROW_FORMAT, Shape, read_rows, to_messages  # noqa: F401 - ROW_FORMAT: for callers

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


@dataclass
class DataStats:
    source: str
    rows: int = 0
    examples: int = 0
    truncated: int = 0  # examples cut to max_seq_len (their tail is not trained on)
    dropped: int = 0  # examples with no assistant token left after truncation
    tokens: int = 0
    label_tokens: int = 0
    packed_rows: int | None = None
    held_out: int = 0  # examples set aside for eval_loss (data.eval_fraction), not counted above

    def describe(self) -> str:
        text = (f"{self.examples} examples from {self.rows} rows of {self.source}: {self.tokens} tokens, "
                f"{self.label_tokens} trained on; {self.truncated} truncated, {self.dropped} dropped")
        text += f"; {self.held_out} more held out for eval_loss" if self.held_out else ""
        return text + (f"; packed into {self.packed_rows} rows" if self.packed_rows is not None else "")


# ---------------------------------------------------------------- formatting and labels


def render_with_spans(tokenizer, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The chat-template text of a conversation and the character spans of its assistant turns.

    A turn's span runs from the end of the template's generation prompt to the end of that turn as rendered
    (its end-of-turn token included): exactly what the model produces at inference.
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (upto.startswith(prompt) and text.startswith(upto)):
            raise UserError("the tokenizer's chat template does not render a conversation as a prefix of the "
                            "longer one, so assistant tokens cannot be located", where=where,
                            fix="use the model's own chat template (tokenizer_config.json chat_template)")
        spans.append((len(prompt), len(upto)))
    return text, spans


def label_tokens(offsets: list[tuple[int, int]], spans: list[tuple[int, int]], ids: list[int]) -> list[int]:
    """-100 for every token whose text starts outside an assistant span."""
    labels = [IGNORE_INDEX] * len(ids)
    for k, (start, end) in enumerate(offsets):
        if end > start and any(lo <= start < hi for lo, hi in spans):
            labels[k] = ids[k]
    return labels


def encode_rows(tokenizer, rows: list[tuple[str, dict]], max_seq_len: int, stats: DataStats,
                shape: Shape | str = "auto") -> list[Example]:
    """Tokenize every row (one batched fast-tokenizer call), label assistant tokens, truncate and count."""
    rendered = [render_with_spans(tokenizer, to_messages(row, where, shape), where) for where, row in rows]
    # The template already wrote <|begin_of_text|>; add_special_tokens would add a second one.
    enc = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    examples = []
    for (_, spans), ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"], strict=True):
        labels = label_tokens(offsets, spans, ids)
        if len(ids) > max_seq_len:
            stats.truncated += 1
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        if all(label == IGNORE_INDEX for label in labels):
            stats.dropped += 1
            continue
        examples.append(Example(ids, labels))
        stats.tokens += len(ids)
        stats.label_tokens += sum(label != IGNORE_INDEX for label in labels)
    stats.rows, stats.examples = len(rows), len(examples)
    return examples


# ---------------------------------------------------------------- packing and collation


PACK_WINDOW = 64  # rows kept open while packing: enough to fill rows to ~99 % on chat data, linear in the data


def pack(examples: list[Example], max_seq_len: int, window: int = PACK_WINDOW) -> list[list[Example]]:
    """First fit over a window of open rows: each whole example goes into the oldest open row with room for it.

    Plain greedy packing (close a row when the next example does not fit) left 11.5 % of the real-length mix as
    padding (ISSUES_LOG B17); the window takes it to 1.0 %. Deterministic for a given order.
    """
    rows: list[list[Example]] = []
    room: list[int] = []  # free tokens of the open rows, rows[len(rows) - len(room):]
    for ex in examples:
        n = len(ex.input_ids)
        first_open = len(rows) - len(room)
        slot = next((i for i, free in enumerate(room) if free >= n), None)
        if slot is None:
            rows.append([ex])
            room.append(max_seq_len - n)
            if len(room) > window:
                room.pop(0)
        else:
            rows[first_open + slot].append(ex)
            room[slot] -= n
    return rows


@dataclass(frozen=True)
class BatchCounts:
    """What one micro-batch holds: real (non-pad) tokens, row slots, trained tokens, sum of squared example lengths
    (the attention term of cogumi.train.flops)."""

    tokens: int = 0
    slots: int = 0
    trained: int = 0
    squared_lengths: int = 0

    def __add__(self, other: BatchCounts) -> BatchCounts:
        return BatchCounts(self.tokens + other.tokens, self.slots + other.slots, self.trained + other.trained,
                           self.squared_lengths + other.squared_lengths)


@dataclass(frozen=True)
class Collator:
    """Pads a micro-batch on the right. Packed rows get per-example position_ids instead of a mask.

    Packed rows need cogumi.train.packed_attention on the model (positions restarting at 0 mark where each example
    begins; padding continues as one more segment of its own). Each example's first token is never a target, as in
    an unpacked row, so the loss over a packed row is the loss of its examples one by one.
    """

    pad_id: int
    packed: bool

    def __call__(self, items: list) -> dict:
        rows = [item if self.packed else [item] for item in items]
        width = max(sum(len(ex.input_ids) for ex in row) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):
            at = 0
            for ex in row:
                n = len(ex.input_ids)
                ids[b, at:at + n] = torch.tensor(ex.input_ids)
                labels[b, at + 1:at + n] = torch.tensor(ex.labels[1:])
                positions[b, at:at + n] = torch.arange(n)
                at += n
            positions[b, at:] = torch.arange(width - at)
        if not self.packed:
            return {"input_ids": ids, "labels": labels, "attention_mask": _real(rows, width).long()}
        return {"input_ids": ids, "labels": labels, "position_ids": positions}

    @staticmethod
    def counts(items: list) -> BatchCounts:
        """The BatchCounts of the micro-batch these items make (without collating them)."""
        rows = [item if isinstance(item, list) else [item] for item in items]
        lengths = [[len(ex.input_ids) for ex in row] for row in rows]
        width = max(sum(row) for row in lengths)
        trained = sum(sum(label != IGNORE_INDEX for label in ex.labels[1:]) for row in rows for ex in row)
        return BatchCounts(sum(map(sum, lengths)), width * len(rows), trained,
                           sum(n * n for row in lengths for n in row))


def _real(rows: list, width: int) -> torch.Tensor:
    """(batch, width) bool: True on the tokens of the examples, False on padding."""
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for b, row in enumerate(rows):
        mask[b, :sum(len(ex.input_ids) for ex in row)] = True
    return mask


# ---------------------------------------------------------------- deterministic order with a saved position


class Batches:
    """An endless stream of collated micro-batches in a seeded order, resumable from `state_dict()`.

    Epoch e visits the items in `randperm(seed + e)`, one effective batch (micro x processes x accumulation) per
    optimizer step; the tail that does not fill a whole effective batch is left out of that epoch (a different
    tail each epoch). So the examples of step s are the same however the effective batch is split: with several
    processes, micro-batch k of the global order goes to rank k % world_size. The position is (epoch, next
    micro-batch index); a resumed run continues with exactly the batch the interrupted run would have taken next,
    also with another number of processes or micro-batch size when the examples consumed divide evenly.
    """

    def __init__(self, items: list, micro_batch_size: int, seed: int, collate: Collator,
                 rank: int = 0, world_size: int = 1, grad_accum: int = 1):
        if not items:
            raise UserError("no training examples left after formatting", where="data.train_path",
                            fix="check the data file and data.max_seq_len")
        self.items, self.micro_batch_size, self.seed, self.collate = items, micro_batch_size, seed, collate
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.epoch, self.index = 0, 0
        self._order = self._permutation(0)

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches each process takes per pass over the data (whole optimizer steps only).

        Fewer items than one effective batch still give one (short) step: the trainer refuses that case earlier
        (trainer.make_plan), this keeps the stream usable on its own.
        """
        per_step = self.micro_batch_size * self.world_size * self.grad_accum
        return max(1, len(self.items) // per_step) * self.grad_accum

    def _permutation(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.items), generator=gen).tolist()

    def __iter__(self):
        return self

    def __next__(self) -> tuple[dict, BatchCounts]:
        """(collated micro-batch, what it holds)."""
        self._roll_over()
        chosen = self._micro_batch(self.index * self.world_size + self.rank)
        self.index += 1
        return self.collate(chosen), Collator.counts(chosen)

    def next_step(self) -> tuple[list[tuple[dict, BatchCounts]], int]:
        """This process's grad_accum micro-batches of the next optimizer step, and the trained tokens of the whole
        step over every process: each rank reads them from the shared order, so no communication is needed."""
        self._roll_over()  # a step never spans two epochs: batches_per_epoch is a multiple of grad_accum
        ranks = range(self.world_size)
        trained = sum(Collator.counts(self._micro_batch((self.index + i) * self.world_size + r)).trained
                      for i in range(self.grad_accum) for r in ranks)
        return [next(self) for _ in range(self.grad_accum)], trained

    def _roll_over(self) -> None:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)

    def _micro_batch(self, k: int) -> list:
        """The items of micro-batch k of this epoch's global order."""
        return [self.items[i] for i in self._order[k * self.micro_batch_size:(k + 1) * self.micro_batch_size]]

    def state_dict(self) -> dict:
        # "consumed" (examples of this epoch taken by all processes together) is what carries over to another
        # number of processes or micro-batch size; index is kept for reading.
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "items": len(self.items),
                "consumed": self.index * self.micro_batch_size * self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state["items"] != len(self.items) or state["seed"] != self.seed:
            raise UserError("the checkpoint's data position does not match this data set (its size or seed changed)",
                            where="data", fix="train on the same data, or start fresh with RESUME=0")
        per_index = self.micro_batch_size * self.world_size
        consumed = state.get("consumed", state["index"] * per_index)
        if consumed % per_index:
            raise UserError(f"the checkpoint stopped after {consumed} examples of epoch {state['epoch']}, which is not "
                            f"a whole number of micro-batches of {self.micro_batch_size} x {self.world_size} processes",
                            where="train.micro_batch_size / GPUS",
                            fix="resume with the micro-batch size and process count the checkpoint was saved with")
        self.epoch, self.index = state["epoch"], consumed // per_index
        self._order = self._permutation(self.epoch)


@dataclass(frozen=True)
class Rows:
    source: str
    rows: list  # (where, row) pairs, every row already checked by to_messages
    eval_rows: list | None = None  # data.eval_path's rows, checked the same way
    eval_source: str | None = None


def read_data(cfg: DataConfig) -> Rows:
    """Read and check every row without a tokenizer, so a bad data file fails before the base downloads."""
    # several sources: a mixture of all their rows, each still named by its own file and line
    read = [read_rows(path, cfg.hub_split) for path in
            (cfg.train_path if isinstance(cfg.train_path, list) else [cfg.train_path])]
    rows, source = [row for part, _ in read for row in part], " + ".join(name for _, name in read)
    eval_rows, eval_source = (read_rows(cfg.eval_path, cfg.hub_split, key="data.eval_path")
                              if cfg.eval_path is not None else (None, None))
    for where, row in rows + (eval_rows or []):
        to_messages(row, where, Shape.of(cfg))
    return Rows(source, rows, eval_rows, eval_source)


@dataclass(frozen=True)
class Encoded:
    """Tokenized training items (examples, or packed rows of examples) and the collator that batches them."""

    items: list
    collate: Collator
    seed: int  # the data order's seed (train.seed + data.shuffle_seed)
    stats: DataStats
    held_out: list = field(default_factory=list)  # eval_loss's items (packed like `items`), never trained on
    held_out_tokens: int = 0

    def batches(self, micro_batch_size: int, *, rank: int = 0, world_size: int = 1, grad_accum: int = 1) -> Batches:
        return Batches(self.items, micro_batch_size, self.seed, self.collate, rank, world_size, grad_accum)


EVAL_SPLIT_SEED = 7919  # added to data.shuffle_seed: the held-out choice does not follow the packing order's seed


def split_held_out(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(training, held out): a seeded `fraction` of the examples (at least one), in file order, before packing."""
    n_eval = max(1, round(fraction * len(examples)))
    if n_eval >= len(examples):
        raise UserError(f"data.eval_fraction={fraction} of {len(examples)} examples leaves nothing to train on",
                        where="data.eval_fraction", fix="add data, or lower data.eval_fraction (e.g. 0.02)")
    gen = torch.Generator().manual_seed(seed + EVAL_SPLIT_SEED)
    chosen = set(torch.randperm(len(examples), generator=gen)[:n_eval].tolist())
    return ([ex for i, ex in enumerate(examples) if i not in chosen],
            [ex for i, ex in enumerate(examples) if i in chosen])


def encode_data(cfg: DataConfig, data: Rows, tokenizer, *, seed: int) -> Encoded:
    """Format, label, truncate, hold out the eval set and optionally pack; the micro-batching comes later (it may
    depend on a probe)."""
    rows, source = data.rows, data.source
    stats = DataStats(source=source)
    examples = encode_rows(tokenizer, rows, cfg.max_seq_len, stats, Shape.of(cfg))
    held_out: list[Example] = []
    if cfg.eval_fraction > 0:
        examples, held_out = split_held_out(examples, cfg.eval_fraction, cfg.shuffle_seed)
        stats.held_out, stats.examples = len(held_out), len(examples)
        stats.tokens -= sum(len(ex.input_ids) for ex in held_out)
        stats.label_tokens -= sum(sum(label != IGNORE_INDEX for label in ex.labels) for ex in held_out)
    elif data.eval_rows is not None:
        held_out = encode_rows(tokenizer, data.eval_rows, cfg.max_seq_len, DataStats(source=data.eval_source),
                               Shape.of(cfg))
        if not held_out:
            raise UserError("no eval examples left after formatting", where="data.eval_path",
                            fix="check the eval file and data.max_seq_len")
    items: list = examples
    eval_items: list = held_out
    if cfg.packing:
        # Pack in a seeded order so rows mix examples from across the file, not neighbours only.
        gen = torch.Generator().manual_seed(cfg.shuffle_seed)
        items = pack([examples[i] for i in torch.randperm(len(examples), generator=gen).tolist()], cfg.max_seq_len)
        eval_items = pack(held_out, cfg.max_seq_len)  # the same rows as training: same kernel, same loss
        stats.packed_rows = len(items)
    if stats.truncated:
        log.warning("data: %d of %d examples were longer than max_seq_len=%d and were truncated",
                    stats.truncated, stats.examples + stats.held_out + stats.dropped, cfg.max_seq_len)
    log.info("data: %s", stats.describe())
    if held_out:
        log.info("eval: %d held-out examples (%s), %d tokens: eval_loss at every train.eval_every steps",
                 len(held_out), data.eval_source or f"data.eval_fraction={cfg.eval_fraction} of the training data",
                 sum(len(ex.input_ids) for ex in held_out))
    collate = Collator(pad_id=_pad_id(tokenizer), packed=cfg.packing)
    return Encoded(items, collate, seed + cfg.shuffle_seed, stats, eval_items,
                   sum(len(ex.input_ids) for ex in held_out))


def build_data(cfg: DataConfig, data: Rows, tokenizer, *, micro_batch_size: int, seed: int,
               rank: int = 0, world_size: int = 1) -> tuple[Batches, DataStats]:
    """encode_data + a batch stream with a fixed micro-batch size."""
    encoded = encode_data(cfg, data, tokenizer, seed=seed)
    return encoded.batches(micro_batch_size, rank=rank, world_size=world_size), encoded.stats


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    # Padding is masked out of attention and labels, so any id works; Llama 3.1 ships no pad token.
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
