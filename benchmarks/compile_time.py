"""AOT compile time of the T5 train step with and without layer scan (`T5Config.scan_layers`).

Lowers and compiles the trainer's real train step (`Trainer.compile_train_step`: loss, grads,
AdamW update, donated sharded state) for a T5 v1.1 shape on 8 simulated CPU devices. Inputs are
abstract (`jax.ShapeDtypeStruct` with the mesh shardings), so no parameter or batch memory is
allocated; only XLA's compile work is measured. Each variant compiles in its own subprocess so
neither benefits from the other's caches.

    python benchmarks/compile_time.py --shape xl --batch 8 --input_len 512 --target_len 128
"""
import argparse
import json
import os
import subprocess
import sys
import time


def _compile_once(args: argparse.Namespace, scan: bool) -> dict:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import jax.numpy as jnp

    from kard_jax.models import t5
    from kard_jax.training import optimizers, partitioning, trainer

    cfg = t5.preset_config(args.shape, scan_layers=scan, remat_policy=args.remat, dtype=args.dtype)
    mesh = partitioning.MeshConfig(data=args.data, model=args.model).make_mesh()
    rules = partitioning.fsdp_logical_axis_rules() if args.fsdp else partitioning.standard_logical_axis_rules()
    tr = trainer.Trainer(trainer._model_from(cfg), optimizers.adamw(1e-4), mesh=mesh, logical_axis_rules=rules)
    shapes = {
        "encoder_input_tokens": (args.batch, args.input_len),
        "decoder_input_tokens": (args.batch, args.target_len),
        "decoder_target_tokens": (args.batch, args.target_len),
        "decoder_loss_weights": (args.batch, args.target_len),
    }
    start = time.perf_counter()
    init = tr.initializer(shapes)
    abstract_state = init.sharded_abstract_state
    abstract_seconds = time.perf_counter() - start
    batch = {
        k: jax.ShapeDtypeStruct(v, jnp.float32 if k == "decoder_loss_weights" else jnp.int32,
                                sharding=partitioning.batch_sharding(mesh, tr.rules, len(v)))
        for k, v in shapes.items()
    }
    tr.compile_train_step(abstract_state, batch)  # lower + compile, timed inside
    analysis = tr.memory_analysis
    return {
        "scan_layers": scan,
        "compile_seconds": round(tr.compile_seconds, 2),
        "abstract_state_seconds": round(abstract_seconds, 2),
        "params": cfg.num_params(),
        "temp_bytes_per_device": getattr(analysis, "temp_size_in_bytes", None),
        "argument_bytes_per_device": getattr(analysis, "argument_size_in_bytes", None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="xl")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--input_len", type=int, default=512)
    parser.add_argument("--target_len", type=int, default=128)
    parser.add_argument("--data", type=int, default=4)
    parser.add_argument("--model", type=int, default=2)
    parser.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--remat", default="full", choices=("none", "full"))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--variants", default="scan,noscan")
    parser.add_argument("--_child", choices=("scan", "noscan"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        print(json.dumps(_compile_once(args, args._child == "scan")))
        return
    print(f"T5 {args.shape} train step, batch {args.batch} x {args.input_len} in / {args.target_len} out, "
          f"mesh data={args.data} model={args.model} ({'fsdp' if args.fsdp else 'standard'} rules), "
          f"remat={args.remat}, dtype={args.dtype}, 8 simulated CPU devices", flush=True)
    base = [a for a in sys.argv[1:] if not a.startswith("--variants")]
    for variant in args.variants.split(","):
        out = subprocess.run([sys.executable, __file__, *base, f"--_child={variant}"], capture_output=True, text=True)
        if out.returncode:
            print(f"{variant}: failed (exit {out.returncode})\n{out.stderr[-3000:]}", flush=True)
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        temp = r["temp_bytes_per_device"]
        print(f"{'scan_layers=True ' if r['scan_layers'] else 'scan_layers=False'}: lower+compile "
              f"{r['compile_seconds']:.1f} s (abstract state {r['abstract_state_seconds']:.1f} s; "
              f"{r['params'] / 1e9:.2f} B params; XLA temp {temp / 2**30:.2f} GiB/device)" if temp is not None else
              f"{variant}: lower+compile {r['compile_seconds']:.1f} s", flush=True)


if __name__ == "__main__":
    main()
