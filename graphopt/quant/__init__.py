"""graphopt.quant: quantization schemes, calibration, layer rules and saved artifacts."""
