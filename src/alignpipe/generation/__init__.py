"""Text generation: one interface (base), two backends (hf, vllm); load picks and loads one."""
