"""Text generation: one interface (base), two backends (hf, vllm), chosen and loaded in load."""
