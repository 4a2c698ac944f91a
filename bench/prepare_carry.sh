#!/usr/bin/env bash
# Make what a device call carries (run tool: carry [".whl", ".carry"]), here, once per checkout: both are
# ignored by git, so a new checkout has neither.
#   .whl/    the packages the GPU image lacks (Python 3.12 wheels; bitsandbytes cut down to its CUDA 13 library)
#   .carry/  the release tokenizer and the AdvertiseGen dev set from ../shared (never committed)
# Usage: bash bench/prepare_carry.sh        (then: du -sh .whl .carry; the run tool takes 64 MiB a call)
#        bash bench/prepare_carry.sh newest (.whl-newest: for run_device.sh prompt-newest)
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared/reference}
grep -qx '/.carry/' .git/info/exclude 2>/dev/null || echo /.carry/ >> .git/info/exclude
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)

if [ "${1:-}" = newest ]; then
  # `bash bench/prepare_carry.sh newest`: .whl-newest/ for run_device.sh prompt-newest, the newest transformers with
  # what it needs beyond the GPU image (a newer hub and tokenizers, kernels; numpy is there), and platformdirs
  grep -qx '/.whl-newest/' .git/info/exclude 2>/dev/null || echo /.whl-newest/ >> .git/info/exclude
  rm -rf .whl-newest && mkdir -p .whl-newest
  python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
    -d .whl-newest transformers platformdirs
  rm -f .whl-newest/numpy-*.whl
  du -sh .whl-newest
  exit 0
fi

mkdir -p .carry
cp "$SHARED/chatglm2/tokenizer.model" .carry/tokenizer.model
cp "$SHARED/advertisegen/dev.json" .carry/dev.json

# The GPU image has torch, transformers, accelerate and peft; these are what glmchat imports beyond them.
PACKAGES=(bitsandbytes jieba datasets dill multiprocess fastapi starlette pydantic pydantic-core annotated-types
          typing-inspection opentelemetry-api uvicorn h11 platformdirs nltk rouge-chinese textual rich
          markdown-it-py mdurl linkify-it-py uc-micro-py mdit-py-plugins httpx-sse)
rm -rf .whl && mkdir -p .whl
for name in "${PACKAGES[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl "$name" 2>/dev/null || python3 -m pip download -q --no-deps --no-binary=:none: -d .whl "$name"
done
# rouge-chinese and jieba ship source only: build them into wheels (pure Python)
for sdist in .whl/*.tar.gz; do
  [ -e "$sdist" ] || continue
  python3 -m pip wheel -q --no-deps -w .whl "$sdist" && rm "$sdist"
done

# bitsandbytes carries a library per CUDA, ROCm and XPU version: keep the CUDA 13 ones (the device's torch) and the CPU one
bnb=$(ls .whl/bitsandbytes-*.whl)
work=$(mktemp -d)
python3 -m zipfile -e "$bnb" "$work"
find "$work/bitsandbytes" -name 'libbitsandbytes_*' ! -name 'libbitsandbytes_cuda13*' ! -name 'libbitsandbytes_cpu*' -delete
rm "$bnb"
python3 - "$work" "$bnb" <<'EOF'
import base64, hashlib, pathlib, sys, zipfile
root, wheel = pathlib.Path(sys.argv[1]), sys.argv[2]
record = next(root.glob("*.dist-info/RECORD"))
rows = []
for path in sorted(p for p in root.rglob("*") if p.is_file() and p != record):
    data = path.read_bytes()
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    rows.append(f"{path.relative_to(root).as_posix()},sha256={digest},{len(data)}")
rows.append(f"{record.relative_to(root).as_posix()},,")
record.write_text("\n".join(rows) + "\n")
with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as out:
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        out.write(path, path.relative_to(root).as_posix())
EOF
rm -rf "$work"
du -sh .whl .carry
