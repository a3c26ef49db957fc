"""Copy a CUDA source for the CPU emulation (csrc/emu/cuda_emu.h), line for line.

    python rewrite_launches.py SRC.cu OUT.cpp

Rewrites the two constructs that are not C++:
  kernel<<<grid, block[, shmem[, stream]]>>>(args)  ->  kernel + ::emu::LaunchConfig(grid, block, ...)(args)
  extern __shared__ T name[];                         ->  T* name = ::emu::dynamic_shared<T>();
and starts the copy with a #line directive, so diagnostics and sanitizer reports name SRC.cu
and its lines. Nothing else changes; the source itself is never modified.
"""
import re
import sys

LAUNCH = re.compile(r"<<<([^;]*?)>>>", re.S)
DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+((?:__align__\(\s*\d+\s*\)\s+)?)([\w:<>, ]+?)\s+(\w+)\s*\[\s*\]\s*;")


def rewrite(text):
    launches = text.count("<<<")
    text, done = LAUNCH.subn(lambda m: " + ::emu::LaunchConfig(" + m.group(1) + ")", text)
    if done != launches:
        raise SystemExit(f"rewrite_launches: {launches - done} kernel launch(es) not understood")
    return DYNAMIC_SHARED.sub(lambda m: f"{m.group(2)}* {m.group(3)} = ::emu::dynamic_shared<{m.group(2)}>();", text)


def main():
    if len(sys.argv) != 3:
        raise SystemExit("usage: rewrite_launches.py SRC.cu OUT.cpp")
    src, out = sys.argv[1], sys.argv[2]
    with open(src, encoding="utf-8") as f:
        text = f.read()
    with open(out, "w", encoding="utf-8") as f:
        f.write(f'#line 1 "{src}"\n' + rewrite(text))


if __name__ == "__main__":
    main()
