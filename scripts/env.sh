# Sourced by the scripts: use Vulkan (lavapipe on a machine without a GPU) unless told otherwise.
export WGPU_BACKEND="${WGPU_BACKEND:-vulkan}"
# Mesa warns without a runtime dir; give it a private one.
if [ -z "${XDG_RUNTIME_DIR:-}" ] || [ ! -d "${XDG_RUNTIME_DIR}" ]; then
  XDG_RUNTIME_DIR="$(mktemp -d)"
  export XDG_RUNTIME_DIR
fi
if [ -x "$HOME/.cargo/bin/cargo" ]; then export PATH="$HOME/.cargo/bin:$PATH"; fi
