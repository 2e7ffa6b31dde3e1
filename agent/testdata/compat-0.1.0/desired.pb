
…
compat-1€ÔŽ”¬3*µ
defaultW
grid-anomaly1.0.0@4f1c2ab8a3e7fcbf3b8f1d2c6a0d9e8b7c6f5a4e3d2c1b0a9f8e7d6c5b4a3f2eN/v1/artifacts/4f1c2ab8a3e7fcbf3b8f1d2c6a0d9e8b7c6f5a4e3d2c1b0a9f8e7d6c5b4a3f2e è28
0.2.0"/v1/artifacts/agent-releases/0.2.0agent-0.2.0