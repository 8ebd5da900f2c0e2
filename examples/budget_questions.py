"""Ask the cost model budget questions without recalibrating: error against budget, FLOPs as sympy.

    python examples/budget_questions.py
"""

import ranapass
from ranapass.cost_model import flops

model, tokenizer = ranapass.load_model()
profile = ranapass.profile(model, ranapass.calibration_windows(tokenizer, num_windows=128))  # cached

for point in profile.curve([0.4, 0.5, 0.56, 0.7, 0.9]):
    print(f"budget {point['budget']:.2f}: predicted error {point['predicted_error']:.4g}")

plan = profile.plan(budget=0.56, fit=False)                       # instant: allocation only
expressions = plan.flops()                                        # sympy, in T (tokens)
print("dense    ", expressions["dense"])
print("adapted  ", expressions["adapted"])
print("per token", flops.per_token(expressions["adapted"]) / flops.per_token(expressions["dense"]))
print(ranapass.cost_model.dense_flops(model)["attention"])        # in T and S (keys attended)
