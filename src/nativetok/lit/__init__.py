"""Lightning glue: LightningModules, callbacks (HNT growth, image grids), EMA and trainer building."""
