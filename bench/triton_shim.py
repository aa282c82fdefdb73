"""The few Triton internals the bench needs, in one place and checked against the versions they were read from.

bench.compile_check records the launches our kernels make (Autotuner.run and JITFunction.run swapped for a
recorder) and compiles each for a GPU target the way JITFunction.run would (bind, specialise, pack, compile).
Those are private APIs: they exist as used here in triton 3.5 to 3.9, and an unknown version is refused in
one line rather than failing somewhere inside Triton.
"""
import contextlib
import io

import triton

from train.errors import UserError

TESTED = ((3, 5), (3, 9))  # oldest and newest triton (major, minor) whose internals match what is used here


def check_version(version: str = triton.__version__) -> None:
    major_minor = tuple(int(p) for p in version.split(".")[:2])
    if not TESTED[0] <= major_minor <= TESTED[1]:
        raise UserError(f"bench.compile_check reads Triton internals known for triton "
                        f"{'.'.join(map(str, TESTED[0]))} to {'.'.join(map(str, TESTED[1]))}; this is {version}")


@contextlib.contextmanager
def recording_launches(on_autotuned, on_plain):
    """Within the block no Triton kernel runs: an autotuned launch calls on_autotuned(jit_fn, args, kwargs,
    configs as dicts), a plain one on_plain(jit_fn, args, kwargs)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    def autotuned(self, *args, **kwargs):
        fn = self.fn
        while not isinstance(fn, JITFunction):  # heuristics wrap the jit function
            fn = fn.fn
        kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}  # how, not what, to launch
        on_autotuned(fn, args, kwargs, [c.all_kwargs() for c in self.configs])

    def plain(self, *args, grid, warmup, **kwargs):
        on_plain(self, args, kwargs)

    saved = Autotuner.run, JITFunction.run
    Autotuner.run, JITFunction.run = autotuned, plain
    try:
        yield
    finally:
        Autotuner.run, JITFunction.run = saved


def compile_for(fn, args: tuple, kwargs: dict, arch: int):
    """(compiled kernel, ptxas -v log) of the jit function fn launched with args and kwargs, on sm_<arch>."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    # what JITFunction.run does before compiling: bind, specialise (alignment, divisibility), pack
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    log = io.StringIO()
    saved = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    # ptxas -v (registers, spills) is printed to stdout, and only when ptxas runs: no cache
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                    options=options.__dict__)
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
    return kernel, log.getvalue()


def autotune_choices(autotuner) -> list[tuple[dict, dict]]:
    """What an autotuner chose: (its key as {key name: value, "dtype": first tensor's dtype}, the config as
    {"kwargs", "num_warps", "num_stages"}) for every key it has tuned. Autotuner.cache maps (key values...,
    dtypes of the tensor arguments...) to the chosen triton.Config."""
    out = []
    for key, config in autotuner.cache.items():
        values = dict(zip(autotuner.keys, key))
        dtypes = key[len(autotuner.keys):]
        values["dtype"] = str(dtypes[0]).removeprefix("torch.") if dtypes else None
        out.append((values, {"kwargs": dict(config.kwargs), "num_warps": config.num_warps,
                             "num_stages": config.num_stages}))
    return out
