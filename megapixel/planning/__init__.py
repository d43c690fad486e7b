"""Planning a layout before any GPU is rented: parameter and FLOP counts (`counts`), memory and time per GPU of one
layout (`estimate`), and the search for the fastest layout that fits (`search`)."""
