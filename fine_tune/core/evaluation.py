"""Evaluation: the loss and the task's metrics over a whole split, each example counted once on
any world size (``gather_for_metrics`` drops the duplicates that pad the last batch)."""

from __future__ import annotations

from fine_tune.core.distributed import stop_requested_anywhere


class EvaluationInterrupted(Exception):
    """A stop signal arrived during an evaluation: it is abandoned (and redone on resume)."""


def evaluate(model, loader, accelerator, task, labels, cfg, extra_metrics=(), stop=None) -> dict:
    """Loss and metrics over the whole loader. With ``stop``, a stop signal on any process ends
    it (EvaluationInterrupted) at the next batch."""
    import torch

    losses, units, preds, golds = gather_predictions(model, loader, accelerator, task, stop)
    total_units = float(torch.cat(units).sum())
    result = {"loss": float(torch.cat(losses).sum()) / max(total_units, 1.0),
              "samples": sum(len(u) for u in units)}  # each example once, whatever the world size
    result.update(task.loss_metrics(result["loss"]))  # a language model's perplexity
    metrics, p_arr, g_arr = task.eval_metrics(preds, golds, labels, cfg)
    result.update(metrics)
    for metric in extra_metrics:
        computed = metric.compute(predictions=p_arr.tolist(), references=g_arr.tolist())
        result.update({f"{metric.name}_{k}" if k in result else k: v for k, v in computed.items()
                       if isinstance(v, (int, float))})
    return result


def gather_predictions(model, loader, accelerator, task, stop=None) -> tuple[list, list, list, list]:
    """Per batch, from every process: the examples' loss sums and loss units, the task's
    predictions and the targets (on the CPU)."""
    import torch

    model.eval()
    losses, units, preds, golds = [], [], [], []
    no_grad = torch.no_grad() if accelerator.state.deepspeed_plugin else torch.inference_mode()
    with no_grad:
        for batch in loader:
            if stop is not None and stop_requested_anywhere(stop, accelerator):
                model.train()
                raise EvaluationInterrupted
            weight, target = batch.pop("weight"), batch.pop("labels")
            logits = model(**batch, **task.forward_options).logits
            # per-example loss sums and unit counts, so that gather_for_metrics can drop duplicates
            per_example = task.example_losses(logits, target, weight)
            count, pred, target = task.eval_batch(logits, target, accelerator)
            per_example, count, pred, target = accelerator.gather_for_metrics((per_example, count, pred, target))
            losses.append(per_example.float().cpu())
            units.append(count.cpu())
            preds.append(pred.cpu())
            golds.append(target.cpu())
    model.train()
    return losses, units, preds, golds
