"""The quantization core, framework-neutral: the quantizers' maths, the policy that selects layers, and
what a quantized kernel becomes in each mode (training, threshold pass, packed)."""
