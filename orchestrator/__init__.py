"""Plans a run and launches its stages. Never imports torch: planning is instant, and works without CUDA."""
