# Sourced by scripts/gpu/check.sh and train.sh, from the repository root: the environment of a GPU run.
# - SimpleITK and MONAI from .gpu/site.tar.xz when pack.sh made it (a machine that lacks them and reaches no index);
# - the shared data from .gpu/data when the checkout has no ../shared/data beside it (the default textscf reads);
# - the engine from this checkout; TEXTSCF_DEVICE (default cuda), PYTHON (default python3).
if [ -f .gpu/site.tar.xz ]; then
  mkdir -p /tmp/textscf-site
  tar -xJf .gpu/site.tar.xz -C /tmp/textscf-site || exit 1
  export PYTHONPATH=/tmp/textscf-site
fi
if [ ! -e ../shared/data ] && [ -d .gpu/data ]; then
  mkdir -p ../shared && ln -s "$PWD/.gpu/data" ../shared/data
fi
export PYTHONPATH="$PWD/TextSCFRegistration:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
device=${TEXTSCF_DEVICE:-cuda}
py=${PYTHON:-python3}
threads=$(nproc)

# versions FILE: the GPU, its driver and the packages, into FILE (and the output); fails when one is missing.
versions() {
  {
    [ "$device" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$py" -c "
import SimpleITK, monai, numpy, torch
print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')
print('SimpleITK', SimpleITK.Version_VersionString(), 'monai', monai.__version__, 'numpy', numpy.__version__)"
  } 2>&1 | tee "$1"
}
