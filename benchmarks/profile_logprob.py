"""
Where one log-prob forward+backward spends its time: torch.profiler over one step of one path.

    python -m benchmarks.profile_logprob --path grouped --prompt-len 2048 --completion-len 128 --group-size 8

Prints the ops sorted by self CPU time (one warmup step first), the time inside the split attention (forward, by
`record_function` ranges around the model's attention modules), and optionally writes a Chrome trace.
"""

import argparse
import tempfile
import time

from torch.profiler import ProfilerActivity, profile, record_function

from .common import PATHS, Point, prepare


def _label_attention_modules(model) -> None:
    """Wrap each attention module's forward in a profiler range, so its share shows up in the table."""
    for name, module in model.named_modules():
        if name.endswith("self_attn"):
            forward = module.forward

            def labelled(*args, _forward=forward, **kwargs):
                with record_function("bench::self_attn.forward"):
                    return _forward(*args, **kwargs)

            module.forward = labelled


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", choices=PATHS, default="grouped")
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--completion-len", type=int, default=128)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--num-groups", type=int, default=1)
    parser.add_argument("--shape", default="cpu-small")
    parser.add_argument("--row-limit", type=int, default=25)
    parser.add_argument("--sort", default="self_cpu_time_total")
    parser.add_argument("--group-by-shape", action="store_true", help="split rows by input shapes")
    parser.add_argument("--trace", help="write a Chrome trace (chrome://tracing, perfetto) to this file")
    args = parser.parse_args(argv)

    point = Point(args.prompt_len, args.completion_len, args.group_size, args.num_groups)
    with tempfile.TemporaryDirectory() as output_dir:
        setup = prepare(args.path, point, args.shape, "cpu", output_dir)
        _label_attention_modules(setup.model)
        start = time.perf_counter()
        setup.step()
        print(f"{args.path} {point.label()}: warmup step {time.perf_counter() - start:.2f} s")
        with profile(activities=[ProfilerActivity.CPU], record_shapes=args.group_by_shape) as prof:
            start = time.perf_counter()
            setup.step()
            elapsed = time.perf_counter() - start
    print(f"profiled step {elapsed:.2f} s (profiler overhead included)")
    averages = prof.key_averages(group_by_input_shape=args.group_by_shape)
    print(averages.table(sort_by=args.sort, row_limit=args.row_limit, max_name_column_width=60))
    if args.trace:
        prof.export_chrome_trace(args.trace)
        print(f"trace written to {args.trace}")


if __name__ == "__main__":
    main()
