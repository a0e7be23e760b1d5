//! A quiet start on a headless Linux machine.
//!
//! wgpu's Vulkan backend enables every window-system surface extension the loader offers
//! (`VK_KHR_wayland_surface` among them, unconditionally: wgpu-hal's `desired_extensions`), even
//! for a compute-only instance. Mesa's implicit device-selection layer
//! (`VK_LAYER_MESA_device_select`) sees the Wayland extension enabled and, to find the default
//! GPU, calls libwayland's `wl_display_connect`, which, when `XDG_RUNTIME_DIR` is unset, prints
//! `error: XDG_RUNTIME_DIR is invalid or not set in the environment.` to stderr from C, once per
//! device enumeration (twice per run), although nothing is wrong. wgpu has no option to skip the
//! surface extensions, and disabling the layer (`NODEVICE_SELECT=1`) would change which GPU
//! is picked on a multi-GPU machine. So, only when `XDG_RUNTIME_DIR` is unset or not an
//! existing absolute directory (and so no window system could be reached through it anyway),
//! point it at a fresh private empty directory: the probe then finds no Wayland socket and
//! fails silently. A valid `XDG_RUNTIME_DIR` is never touched, and every other message of the
//! driver or loader still reaches stderr.
//!
//! The GL backend (enumerated by `info`, `doctor` and any run without `WGPU_BACKEND`) has a
//! second one: Mesa's surfaceless EGL first tries a hardware driver through a DRM render node,
//! reports `DRI2: failed to load driver` through the EGL debug callback (which wgpu logs at
//! error level) and then retries with software rendering, which works. Where no render node
//! exists (`/dev/dri/renderD*`), no hardware driver can load, so asking for software rendering
//! up front (`LIBGL_ALWAYS_SOFTWARE=1`, only if unset) selects the driver the retry would have
//! selected, without the failed attempt. A machine with a render node is left alone.

use std::path::PathBuf;

/// Removes the private runtime directory (if one was made) when dropped, at the end of `main`.
pub struct RuntimeDir(Option<PathBuf>);

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        if let Some(dir) = &self.0 {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Sets `XDG_RUNTIME_DIR` to a private empty directory when it is unset or invalid, and
/// `LIBGL_ALWAYS_SOFTWARE=1` when unset and no render node exists. Call first
/// thing in `main`, before any thread exists (setting the environment is only sound while the
/// process has a single thread) and before any wgpu instance is created.
#[cfg(all(unix, not(target_os = "macos")))]
pub fn quiet_window_system_probe() -> RuntimeDir {
    use std::os::unix::fs::DirBuilderExt;
    if std::env::var_os("LIBGL_ALWAYS_SOFTWARE").is_none() && !has_render_node() {
        std::env::set_var("LIBGL_ALWAYS_SOFTWARE", "1");
    }
    let valid = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .is_some_and(|d| d.is_absolute() && d.is_dir());
    if valid {
        return RuntimeDir(None);
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!(
        "multipole-attn-runtime-{}-{nanos}",
        std::process::id()
    ));
    // 0700, as the XDG spec asks of a runtime directory; if it cannot be made, the only cost is
    // the harmless message, so carry on without it.
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {
            std::env::set_var("XDG_RUNTIME_DIR", &dir);
            RuntimeDir(Some(dir))
        }
        Err(_) => RuntimeDir(None),
    }
}

/// Whether a DRM render node exists, i.e. a hardware GL driver could load at all.
#[cfg(all(unix, not(target_os = "macos")))]
fn has_render_node() -> bool {
    std::fs::read_dir("/dev/dri").is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("renderD"))
    })
}

/// Elsewhere there is no Wayland probe to quieten.
#[cfg(not(all(unix, not(target_os = "macos"))))]
pub fn quiet_window_system_probe() -> RuntimeDir {
    RuntimeDir(None)
}
