"""End-to-end pipelines: resumable run folders and stages, `msm demo` and `msm benchmark`."""
