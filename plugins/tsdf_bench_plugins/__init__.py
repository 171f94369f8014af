"""tsdf-bench built-in plugins, registered through the public ``tsdf_bench`` entry points."""
