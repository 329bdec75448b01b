"""Converting the reference GILL release (kohjingyu/gill) into a GILL pipeline or learned-weights folder
(docs/conversion.md). It sits above `pipeline/`: it builds pipelines, and nothing in the library imports it."""
