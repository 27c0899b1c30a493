"""Pipeline layer: the stage chain, skip/resume logic, batch runs."""
