"""Orchestration: one `run_*` entry per command, each taking its validated config.

    prune       jobs.prune.run_prune          quantize   jobs.quantize.run_quantize
    compress    jobs.quantize.run_compress    export     jobs.export.run_export (every target)
    eval        jobs.inspect.run_eval         sim        jobs.inspect.run_sim (--check-images: run_check_images)
    onnx-check  jobs.inspect.run_onnx_check   gpu-run    jobs.inspect.run_gpu_run

Configs, their defaults, flags and validation: jobs.config. What the model-writing jobs share (load,
calibrate, memory facts, compression.json): jobs.common. The CLI only parses and calls these.
"""
