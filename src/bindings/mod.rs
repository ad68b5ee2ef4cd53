//! The PyO3 module `candle_phi._native`. Arguments are converted while the GIL is held;
//! all model work then runs with the GIL released.

mod args;
mod errors;
mod generator;
mod interrupt;
mod options;
mod stream;
mod tokenizer;

use pyo3::prelude::*;

#[pymodule(name = "_native")]
fn native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    interrupt::record_main_thread(m.py())?;
    m.add_class::<generator::PyPhi3Generator>()?;
    m.add_class::<tokenizer::PyTokenizer>()?;
    m.add_class::<stream::PyTokenStream>()?;
    m.add_class::<stream::PyTokenEvents>()?;
    m.add_class::<stream::PyTokenEvent>()?;
    m.add_class::<stream::PyTokenLogprob>()?;
    m.add_class::<stream::PyTopLogprob>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
