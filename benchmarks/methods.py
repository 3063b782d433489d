"""Method-level performance benchmarks (CPU or GPU), each checked for correctness.

    python benchmarks/methods.py [--quick | --smoke] [--json] [--threads N] [--device cpu|cuda]

Sizes follow the protocol: ConvNet width 128 on real Fashion-MNIST (scikit-
learn digits when it is not installed; the output says which), IPC 10, DC's
batch_real 256. --quick runs one timed repeat of each and fewer epochs;
--smoke uses tiny sizes and only proves the script and its JSON work. On a
CUDA machine everything runs on the GPU (--device) and the matmul peak is the
GPU's.

(a) matching_speedup: one DC/DSA matching step as `GradientMatcher` computes
    it on this device for a long run (CPU: class blocks in cache-sized tiles,
    real side compiled; CUDA: all classes in one batch) vs upstream's per-class
    loop (eager), same real batch, synthetic set, augmentation and network.
    Every other mode is timed too (`matching_modes`), so the gain is split
    into its levers; losses and image gradients must agree within tolerance.
(b) evaluation_speedup: M evaluation networks trained and tested the way the
    evaluation stage does it on this device for a protocol-size evaluation
    (`evaluate_repeats`; CPU: one network at a time, tiled steps, compiled,
    test batches of 32; CUDA: folded into one grouped network) vs
    upstream's form, one network at a time with whole-batch steps and test
    batches of 256; same
    initialisations, seeds, validation selection and test sets. The stacking
    implementations are timed against the same baseline:
    `evaluation_folded_speedup` (grouped convolutions, tiled like the engine)
    and `evaluation_vmap_speedup` (stack_module_state + vmap, training steps
    only). Results must agree within tolerance.
(c) peak_fraction: achieved FLOP/s of DM's real-batch embedding (ConvNet
    width 128, 256 x 10 images, 3x28x28, forward, FLOPs counted with
    FlopCounterMode) over the machine's float32 matmul peak (torch.mm on large
    matrices), at the same thread count. Levers tried on that forward:
    channels_last memory format, torch.compile, and cache-sized chunks of 32
    images; each is reported with its speedup and whether its output matches
    the baseline. `peak_fraction` is that of the loop DM runs (its
    `engines.RealEmbedder` on a long run: chunks, compiled on CPU), `peak_fraction_eager`
    the plain eager forward of the whole batch. The other two hot loops get the same figure from
    (a) and (b): `peak_fraction_matching` and `peak_fraction_evaluation`.

Timings are medians over repeats after a warm-up run. With --json the last
stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

import stacked  # benchmarks/stacked.py: the vmap form, benchmark-only
from distill_core import evaluation, grouped
from distill_core.augment import SiameseAugment
from distill_core.data import DatasetUnavailable, build_biased_dataset, load_source
from distill_core.evaluation import EvalConfig, EvalSets
from distill_core.methods import engines
from distill_core.methods.base import DistillConfig, init_synthetic
from distill_core.networks import build_network
from distill_core.runtime import Runtime
from distill_core.sets import RealData, SyntheticSet
from distill_core.tiling import batch_backward, ce_sum


# sizes per budget; "smoke" only proves the script and its JSON interface work (tests run it)
SIZES = {
    "smoke": {"width": 16, "batch_real": 16, "ipc": 2, "repeats": 1, "models": 2, "epochs": 2, "n_test": 200,
              "vmap_epochs": 1, "embed_images": 160, "data": ("digits",)},
    "quick": {"width": 128, "batch_real": 256, "ipc": 10, "repeats": 1, "models": 4, "epochs": 10, "n_test": 2000,
              "vmap_epochs": 3, "embed_images": 2560, "data": ("fashion_mnist", "digits")},
    "full": {"width": 128, "batch_real": 256, "ipc": 10, "repeats": 3, "models": 10, "epochs": 100, "n_test": 10000,
             "vmap_epochs": 10, "embed_images": 2560, "data": ("fashion_mnist", "digits")},
}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up (and compilation, where a path compiles)
    times, out = [], None
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def log(msg: str) -> None:
    print(msg, flush=True)


def load_real(names: tuple[str, ...], device: torch.device) -> tuple[RealData, str]:
    """Real Fashion-MNIST when it is on this machine, else scikit-learn's digits (always there)."""
    for name in names:
        try:
            ds = build_biased_dataset(load_source(name, download=False), "none", 0.1, 1)
            return RealData.from_dataset(ds, device), name
        except DatasetUnavailable:
            log(f"{name} is not available locally; trying the next source")
    raise SystemExit("no benchmark data: install scikit-learn (digits)")


def flops_of(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# --- (a) gradient matching ----------------------------------------------------------------------

def bench_matching(real: RealData, size: dict, peak: float) -> dict:
    width, batch_real, ipc, repeats = size["width"], size["batch_real"], size["ipc"], size["repeats"]
    k = real.num_classes
    device = real.device
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = build_network("convnet", real.shape[0], k, real.shape[-1], width=width).to(device)
    cfg = DistillConfig(method="dsa", ipc=ipc, iterations=1000, lr_img=0.1, init="real")
    x_syn = init_synthetic(real, cfg, g).images.requires_grad_(True)
    y_syn = torch.arange(k, device=device).repeat_interleave(ipc)
    real_batch = engines.sample_real_batch(real, batch_real, g)
    augment = SiameseAugment()
    seed = 1234
    real_batch = real_batch.with_images(augment(real_batch.images, seed, real_batch.labels, k))
    # the engine a long run (1000 iterations x 10 outer steps, as upstream's IPC 10) gets on this device
    default = engines.GradientMatcher.from_runtime(Runtime(device=str(device)), 1000 * 10, k, batch_real)
    matchers = {
        "loop": engines.GradientMatcher("loop"),
        "batched": engines.GradientMatcher("batched"),
        "tiled": engines.GradientMatcher("tiled"),
        "tiled_compiled": engines.GradientMatcher("tiled", compile=True),
    }

    def step(matcher):
        syn_batch = engines.synthetic_batch(augment(x_syn, seed, y_syn, k), y_syn, k)
        loss = matcher(net, real_batch, syn_batch)
        grad, = torch.autograd.grad(loss, x_syn)
        return loss.detach(), grad

    flops = flops_of(lambda: step(matchers["loop"]))
    times, outs = {}, {}
    for name, matcher in matchers.items():
        t0 = time.perf_counter()
        times[name], outs[name] = median_time(lambda: step(matcher), repeats)
        log(f"(a) matching, {name}: {times[name]:.2f}s per step (first call incl. warm-up "
            f"{time.perf_counter() - t0 - repeats * times[name]:.1f}s)")
    loss_l, grad_l = outs["loop"]
    modes = {}
    for name in matchers:
        loss, grad = outs[name]
        loss_rel = float((loss - loss_l).abs() / loss_l.abs())
        grad_rel = float((grad - grad_l).norm() / grad_l.norm())
        modes[name] = {"s": times[name], "speedup": times["loop"] / times[name], "loss_rel_diff": loss_rel,
                       "grad_rel_diff": grad_rel, "agrees": loss_rel < 1e-4 and grad_rel < 1e-3}
    used = "tiled_compiled" if default.mode == "tiled" and default.real_loss.compiled else default.mode
    ok = all(m["agrees"] for m in modes.values())
    res = {"matching_speedup": modes[used]["speedup"], "matching_path": used, "matching_modes": modes,
           "matching_identical": ok, "matching_gflop": flops / 1e9,
           "peak_fraction_matching": flops / times[used] / peak,
           "matching_setup": f"ConvNet w{width}, IPC {ipc}, batch_real {batch_real} "
                             f"({min(real_batch.counts)}-{max(real_batch.counts)} per class), DSA, {k} classes"}
    for name, m in modes.items():
        log(f"    {name:15s} {m['speedup']:.2f}x vs upstream loop; loss rel diff {m['loss_rel_diff']:.1e}, "
            f"image-grad rel diff {m['grad_rel_diff']:.1e}")
    log(f"(a) matching_speedup {res['matching_speedup']:.2f}x ({used}, the path DC runs here); "
        f"{flops / 1e9:.0f} GFLOP per step -> {res['peak_fraction_matching']:.2f} of matmul peak "
        f"({'identical within tolerance' if ok else 'MISMATCH'})")
    return res


# --- (b) evaluation of several networks -------------------------------------------------------

def bench_evaluation(real: RealData, size: dict, peak: float) -> dict:
    models, epochs, width, ipc = size["models"], size["epochs"], size["width"], size["ipc"]
    k = real.num_classes
    idx = torch.cat([i[:ipc] for i in real.class_index])
    images, labels = real.images[idx], real.labels[idx]
    syn = SyntheticSet(images, labels, real.norm)
    n_test = size["n_test"]  # the protocol's test sets are 10000 images each
    rest = torch.cat([i[ipc:] for i in real.class_index])
    val, test = rest[:500], rest[500:500 + n_test]
    sets = EvalSets(val=(real.images[val], real.labels[val]), test=(real.images[test], real.labels[test]),
                    unbiased=(real.images[test], real.labels[test]), unbiased_aligned=None, num_classes=k)
    ecfg = EvalConfig(arch="convnet", arch_options={"width": width}, epochs=epochs, checkpoints=4, repeats=models)
    # the engine compiles as it would for a protocol-size evaluation (20 networks x 300 epochs, 7 tiles a step)
    device = str(real.device)
    protocol_compile = Runtime(device=device).compile_for(20 * 301 * 7)
    runtime = Runtime(device=device, compile=protocol_compile)
    # upstream's form: one network at a time, whole-batch steps, test batches of 256
    baseline = Runtime(device=device, compile=False, tile=0, fold=False, predict_batch=256)
    ce = runtime.compiled(ce_sum, 10**9 if protocol_compile else 0)

    def one_at_a_time():
        return [evaluation.train_and_evaluate(syn, sets, ecfg, r, baseline) for r in range(models)]

    def engine():  # what the evaluation stage runs on this device
        return evaluation.evaluate_repeats(syn, sets, ecfg, runtime)

    def folded():
        return grouped.train_and_evaluate_folded(syn, sets, ecfg, list(range(models)), runtime)

    t0 = time.perf_counter()  # compile the engine's step shapes once, outside the timings
    evaluation.train_and_evaluate(syn, sets, ecfg.model_copy(update={"epochs": 1, "checkpoints": 1}), 0, runtime, ce)
    warmup_s = time.perf_counter() - t0
    log(f"(b) evaluation, engine warm-up (compiled: {protocol_compile}): {warmup_s:.1f}s")
    runs = {}
    for name, fn in (("one_at_a_time", one_at_a_time), ("engine", engine), ("folded", folded)):
        t0 = time.perf_counter()
        out = fn()
        runs[name] = (time.perf_counter() - t0, out)
        log(f"(b) evaluation, {name}: {runs[name][0]:.1f}s for {models} networks")
    t_base, base = runs["one_at_a_time"]
    checks = {}
    for name in ("engine", "folded"):
        out = runs[name][1]
        acc_diff = max(abs(a["acc"] - b["acc"]) for a, b in zip(base, out))
        same_epochs = all(a["epoch"] == b["epoch"] for a, b in zip(base, out))
        checks[name] = {"max_acc_diff": acc_diff, "same_selected_epochs": same_epochs,
                        "agrees": acc_diff <= 2.0 / len(test) and same_epochs}

    # vmap stacking, training steps only (it has no validation path), on fewer epochs: it is slow on CPU
    vcfg = EvalConfig(arch="convnet", arch_options={"width": width}, epochs=size["vmap_epochs"])
    factory = stacked.architecture_factory(vcfg, real.shape[0], k, real.shape[-1])
    seeds = stacked.default_seeds(vcfg, models)
    initial = [m.to(real.device) for m in stacked.build_models(factory, seeds)]
    copies = [copy.deepcopy(m) for m in initial]
    t0 = time.perf_counter()
    trained_stacked = stacked.train_stacked(initial, images, labels, vcfg, seeds=seeds)
    t_vmap = time.perf_counter() - t0
    t0 = time.perf_counter()
    trained_seq = [stacked.train_one(m, images, labels, vcfg, s) for m, s in zip(copies, seeds)]
    t_seq = time.perf_counter() - t0
    max_diff = max(float((a - b).abs().max()) for m1, m2 in zip(trained_stacked, trained_seq)
                   for a, b in zip(m1.state_dict().values(), m2.state_dict().values()) if a.is_floating_point())
    checks["vmap"] = {"max_param_diff": max_diff, "agrees": max_diff < 1e-3}
    log(f"(b) evaluation, vmap (training only, {vcfg.epochs} epochs): stacked {t_vmap:.1f}s vs one at a time "
        f"{t_seq:.1f}s -> {t_seq / t_vmap:.2f}x; max weight diff {max_diff:.1e}")

    # achieved FLOP/s of the engine's training steps (the hot loop; validation and test excluded)
    net = build_network("convnet", real.shape[0], k, real.shape[-1], width=width).to(real.device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    tile = runtime.tile_for(net)

    def train_step():
        opt.zero_grad(set_to_none=True)
        batch_backward(lambda x, y: ce(net, x, y), images, labels, tile)
        opt.step()

    step_flops = flops_of(train_step)
    t_step, _ = median_time(train_step, 3 * size["repeats"])

    t_engine, t_fold = runs["engine"][0], runs["folded"][0]
    res = {"evaluation_speedup": t_base / t_engine, "evaluation_folded_speedup": t_base / t_fold,
           "evaluation_vmap_speedup": t_seq / t_vmap, "evaluation_one_at_a_time_s": t_base,
           "evaluation_engine_s": t_engine, "evaluation_folded_s": t_fold, "evaluation_checks": checks,
           "evaluation_engine_compiled": protocol_compile, "evaluation_engine_warmup_s": warmup_s,
           "evaluation_identical": all(c["agrees"] for c in checks.values()),
           "evaluation_path": ("folded grouped network" if real.device.type == "cuda" and models > 1
                               else f"one network at a time, steps in tiles of {tile}"
                               + (", compiled" if protocol_compile else "")),
           "peak_fraction_evaluation": step_flops / t_step / peak,
           "evaluation_setup": f"{models} x ConvNet w{width}, IPC {ipc} ({len(labels)} images), {epochs} epochs, "
                               f"4 validation checks on 500 images, test sets 2 x {len(test)}"}
    for name, c in checks.items():
        log(f"    {name}: {'identical within tolerance' if c['agrees'] else 'MISMATCH'} ({c})")
    log(f"(b) evaluation_speedup {res['evaluation_speedup']:.2f}x ({res['evaluation_path']}); folded "
        f"{res['evaluation_folded_speedup']:.2f}x, vmap {res['evaluation_vmap_speedup']:.2f}x; training step "
        f"{step_flops / 1e9:.1f} GFLOP in {t_step * 1e3:.0f} ms -> {res['peak_fraction_evaluation']:.2f} of matmul peak")
    return res


# --- (c) peak fraction --------------------------------------------------------------------------

def matmul_peak(device: torch.device) -> float:
    n = 2048 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    t, _ = median_time(lambda: torch.mm(a, b), 5)
    return 2 * n**3 / t


def bench_peak(size: dict, peak: float, device: torch.device) -> dict:
    torch.manual_seed(0)
    net = build_network("convnet", 3, 10, 28, width=128).to(device).train().requires_grad_(False)
    x = torch.randn(size["embed_images"], 3, 28, 28, device=device)
    flops = flops_of(lambda: net.embed(x))
    repeats = 2 * size["repeats"]

    with torch.no_grad():
        t_base, ref = median_time(lambda: net.embed(x), repeats)
        achieved = flops / t_base
        res = {"dm_embed_gflop": flops / 1e9, "dm_embed_s": t_base,
               "dm_embed_gflops": achieved / 1e9, "peak_fraction": achieved / peak}
        log(f"    DM embedding forward: {flops / 1e9:.1f} GFLOP in {t_base:.2f}s = {achieved / 1e9:.1f} GFLOP/s "
            f"-> peak_fraction {achieved / peak:.3f}")

        levers = {}
        net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        t_cl, out = median_time(lambda: net_cl.embed(x_cl), repeats)
        levers["channels_last"] = {"speedup": t_base / t_cl, "max_abs_diff": float((out - ref).abs().max())}

        try:
            compiled = torch.compile(net.embed)
            t0 = time.perf_counter()
            compiled(x)
            compile_s = time.perf_counter() - t0
            t_c, out = median_time(lambda: compiled(x), repeats)
            levers["torch_compile"] = {"speedup": t_base / t_c, "max_abs_diff": float((out - ref).abs().max()),
                                       "compile_s": compile_s}
        except Exception as exc:  # no compiler toolchain, unsupported backend, ...
            levers["torch_compile"] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}

        # DM's own embedder: cache-sized chunks, eager, and as a long DM run uses it (chunks, compiled)
        chunked = engines.RealEmbedder(compile=False)
        t_ch, out = median_time(lambda: chunked(net, x), repeats)
        levers["cache_chunks"] = {"speedup": t_base / t_ch, "max_abs_diff": float((out - ref).abs().max())}
        # DM's published budget: 20000 iterations of 10 x 256 real images
        dm_path = engines.RealEmbedder.from_runtime(Runtime(device=str(device)), 20000, 2560)
        t_dm, out = median_time(lambda: dm_path(net, x), repeats)
        levers["dm_path"] = {"speedup": t_base / t_dm, "max_abs_diff": float((out - ref).abs().max()),
                             "compiled": dm_path.fn.compiled}

    for name, r in levers.items():
        if "speedup" in r:
            r["helps"] = bool(r["speedup"] > 1.05 and r["max_abs_diff"] < 1e-3 * float(ref.abs().max()))
            r["peak_fraction"] = achieved * r["speedup"] / peak
            log(f"    lever {name}: {r['speedup']:.2f}x, max abs diff {r['max_abs_diff']:.1e}"
                f" -> {'helps' if r['helps'] else 'does not help'}")
        else:
            log(f"    lever {name}: unavailable ({r['error']})")
    res["levers"] = levers
    res["levers_that_help"] = [n for n, r in levers.items() if r.get("helps") and n != "dm_path"]
    # the figure of the loop DM actually runs (distill_core.methods.dm.RealEmbedder on a long run);
    # the plain eager forward stays beside it
    res["peak_fraction_eager"] = res["peak_fraction"]
    res["peak_fraction"] = levers["dm_path"]["peak_fraction"]
    log(f"    peak_fraction of the loop DM runs: {res['peak_fraction']:.3f} (eager {res['peak_fraction_eager']:.3f})")
    return res


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--quick", action="store_true",
                        help="one timed repeat, 4 networks x 10 epochs (about 9 minutes on 1 CPU core)")
    budget.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs (about a minute)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = "smoke" if args.smoke else "quick" if args.quick else "full"
    size = SIZES[name]

    t0 = time.perf_counter()
    real, source = load_real(size["data"], device)
    log(f"device {device}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, {source} "
        f"{len(real.labels)} train images, budget {name}")
    peak = matmul_peak(device)
    log(f"float32 matmul peak: {peak / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} thread(s))")
    results = {"budget": name, "quick": args.quick, "device": str(device), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "data": source, "peak_gflops": peak / 1e9}
    results.update(bench_matching(real, size, peak))
    results.update(bench_evaluation(real, size, peak))
    results.update(bench_peak(size, peak, device))
    results["total_s"] = time.perf_counter() - t0
    log(f"total {results['total_s']:.0f}s")
    if args.json:
        print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
