"""The recipe of the shipped small model (`wuerstchen/assets/small/`) on the shapes world.

    python -m recipes.shapes.recipe --out runs/shapes            # data → A ‖ compressor → CLIP → C ‖ B
    python -m recipes.shapes.compressor --out runs/shapes/semantic --steps 1500
    python -m recipes.shapes.clip --out runs/shapes/clip --semantic runs/shapes/semantic/semantic

The world and its evaluator stay in the package (`wuerstchen.shapes`): `wuerstchen eval` and the
tests need them. These trainers are research scripts tuned to a 2-core machine.
"""
