"""End to end on a Hugging Face model: DemP kills and removes units of a small BERT (ReLU feed-forward blocks)
while it learns a text task generated offline; accuracy and size against the same loop without DemP.

The task: sequences of 16 tokens from a 40-token vocabulary; the label says which of the 8 token sets 1–3, 4–6,
…, 22–24 occurs most often (the first on a tie). Nothing is downloaded: the model is built from a config.

    python benchmarks/hf_end_to_end.py            # 3 seeds (about 5 minutes on 2 CPU cores)
    python benchmarks/hf_end_to_end.py --quick    # 1 seed, 3 epochs, smoke test

Writes ``results/hf_end_to_end.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import lightning.pytorch as pl
import torch
import transformers
from _common import default_jobs, machine, run_parallel, write_json, write_report
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_demp import DemonPruning
from lightning_demp.accounting import count_parameters

VOCAB, LENGTH, CLASSES, SET = 40, 16, 8, 3
RUNS: dict[str, dict[str, Any] | None] = {  # DemonPruning arguments of each run (None: without DemP)
    "dense": None,
    "DemP reg_max=0.03": {"regularizer": "positive_l2", "reg_max": 0.03},
    "DemP reg_max=0.1": {"regularizer": "positive_l2", "reg_max": 0.1},
    "DemP reg_max=0.3": {"regularizer": "positive_l2", "reg_max": 0.3},
    "DemP target=0.4": {"regularizer": "positive_l2", "target_sparsity": 0.4},
}


def token_task(size: int, seed: int) -> TensorDataset:
    """``size`` sequences and their labels: which of the 8 token sets 1–3, 4–6, …, 22–24 occurs most often (the
    first of them on a tie)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (size, LENGTH), generator=generator)
    counts = torch.stack([((ids > SET * k) & (ids <= SET * (k + 1))).sum(dim=1) for k in range(CLASSES)], dim=1)
    return TensorDataset(ids, torch.ones_like(ids), counts.argmax(dim=1))


def as_mapping(items: list[tuple[Tensor, Tensor, Tensor]]) -> dict[str, Tensor]:
    ids, mask, labels = (torch.stack(column) for column in zip(*items, strict=True))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class TextClassifier(pl.LightningModule):
    """A tiny BERT (2 layers, width 64, ReLU feed-forward of 256) built from its config; batches are dicts."""

    def __init__(self, lr: float = 2e-3) -> None:
        super().__init__()
        config = transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
            hidden_act="relu", max_position_embeddings=LENGTH,
        )  # fmt: skip
        config.num_labels = CLASSES
        self.bert = transformers.BertForSequenceClassification(config)
        self.lr = lr

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).logits

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        return nn.functional.cross_entropy(logits, batch["labels"])

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"])
        self.log("test_acc", (logits.argmax(dim=1) == batch["labels"]).float().mean())

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0)
        steps = self.trainer.estimated_stepping_batches
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.lr, total_steps=int(steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def feed_forward_widths(model: TextClassifier) -> list[int]:
    return [layer.intermediate.dense.out_features for layer in model.bert.bert.encoder.layer]


def run(label: str, seed: int, epochs: int) -> dict[str, Any]:
    """One training of ``label``'s recipe: test accuracy, parameters, feed-forward widths, removals by reason."""
    pl.seed_everything(seed, verbose=False)
    model = TextClassifier()
    dense_params = count_parameters(model)
    train = DataLoader(token_task(6000, 1000 + seed), batch_size=64, shuffle=True, collate_fn=as_mapping)
    test = DataLoader(token_task(2000, 7), batch_size=256, collate_fn=as_mapping)
    arguments = RUNS[label]
    demp = None if arguments is None else DemonPruning(prune_every_n_epochs=2, verbose=False, **arguments)
    callbacks: list[pl.Callback] = [] if demp is None else [demp]
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, train_dataloaders=train)
    seconds = time.perf_counter() - start
    accuracy = float(trainer.test(model, dataloaders=test, verbose=False)[0]["test_acc"])
    removed: dict[str, int] = {}
    for event in demp.events if demp is not None else []:
        removed[event.reason] = removed.get(event.reason, 0) + sum(event.removed.values())
    return {
        "label": label,
        "seed": seed,
        "test_acc": accuracy,
        "params": count_parameters(model),
        "params_removed": 1 - count_parameters(model) / dense_params,
        "feed_forward_widths": feed_forward_widths(model),
        "units_removed_by_reason": removed,
        "fit_seconds": seconds,
    }


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * spread:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 epochs")
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=default_jobs())
    args = parser.parse_args()
    seeds, epochs = (args.seeds[:1], 3) if args.quick else (args.seeds, args.epochs)
    calls = [{"label": label, "seed": seed, "epochs": epochs} for seed in seeds for label in RUNS]
    runs = run_parallel(run, calls, jobs=args.jobs)
    name = "hf_end_to_end" + ("_quick" if args.quick else "")
    info = machine()
    write_json(f"{name}.json", {"epochs": epochs, "seeds": seeds, "runs": runs, "machine": info, "jobs": args.jobs})
    dense_acc = statistics.mean(r["test_acc"] for r in runs if r["label"] == "dense")
    lines = [
        f"# End to end on a Hugging Face BERT: DemP against dense ({len(seeds)} seeds, {epochs} epochs)",
        "",
        "A 2-layer BERT (width 64, 4 heads, ReLU feed-forward of 256 units per layer) built from its config learns "
        "an 8-class token-counting task generated offline (which of the token sets 1–3, 4–6, …, 22–24 occurs most "
        "often, the first on a tie; 6,000 training sequences of 16 tokens, 2,000 test). Same "
        "AdamW, one-cycle learning rate and batches for every run; DemP removes units every 2 epochs. Only the "
        "feed-forward units can go: the attention projections feed a reshape into heads and the residual width "
        "is coupled with LayerNorm and the embeddings, so both are kept whole.",
        "",
        "| run | test acc (%) | Δ vs dense (pt) | params removed (%) | feed-forward units left (per seed, both layers) "
        "| units removed dead / by the target |",
        "|---|---|---|---|---|---|",
    ]
    for label in RUNS:
        group = [r for r in runs if r["label"] == label]
        accuracy = statistics.mean(r["test_acc"] for r in group)
        removed = [r["units_removed_by_reason"] for r in group]
        dead = sum(r.get("dead", 0) for r in removed) / len(group)
        forced = sum(v for r in removed for k, v in r.items() if k != "dead") / len(group)
        widths = "; ".join("+".join(str(w) for w in r["feed_forward_widths"]) for r in group)
        lines.append(
            f"| {label} | {mean_std([r['test_acc'] for r in group])} | {100 * (accuracy - dense_acc):+.2f} | "
            f"{mean_std([r['params_removed'] for r in group])} | {widths} | {dead:.0f} / {forced:.0f} |"
        )
    lines += [
        "",
        "Units removed are means per run: *dead* were found dead (or constant) by the checks; *by the target* are "
        "the least important live units a target removes to close its shortfall late in training.",
        "",
        f"Runs: {args.jobs} side by side, one thread each (fit times in the JSON are not speed figures).",
    ]
    write_report(f"{name}.md", lines, info)


if __name__ == "__main__":
    main()
