# Copyright MedAttnSlicer contributors. Apache-2.0.
