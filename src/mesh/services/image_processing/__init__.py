"""The image processing service: a filter registry, CPU (OpenCV) and GPU (CuPy) backends, pipelines."""
