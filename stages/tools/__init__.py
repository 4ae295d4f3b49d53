"""Tools around the stages: checking data, inspecting stores, pictures, the viewer, runs, benchmarks, the demo."""
