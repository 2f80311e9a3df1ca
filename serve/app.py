"""Import path for `serve run serve.app:app key=value ...` and serve configs; the code lives in the package."""

from dreamix_ray.cluster.serving.app import build_app

# An application builder: Serve calls it with the config's `args` (or the CLI's key=value pairs).
app = build_app

__all__ = ["app", "build_app"]
