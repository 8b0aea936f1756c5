"""NativeTok's benchmarks (`make bench`, `make bench-gpu`): scripts beside the package, never imported by it."""
