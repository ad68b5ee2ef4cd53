//! The one mapping from the engine's `Error` onto the Python exception hierarchy, which is
//! defined in `candle_phi/_errors.py` so that classes can also derive from `ValueError` etc.

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

use crate::error::{Error, Operation};

/// The exception class for each kind of engine error.
fn class_name(err: &Error) -> &'static str {
    match err {
        Error::ModelNotFound { .. }
        | Error::Io { .. }
        | Error::NotGguf { .. }
        | Error::Truncated { .. }
        | Error::InvalidGguf { .. }
        | Error::WrongArchitecture { .. }
        | Error::MissingKey { .. }
        | Error::InvalidKey { .. }
        | Error::MissingTensor { .. }
        | Error::TensorShape { .. }
        | Error::UnsupportedTensorType { .. }
        | Error::Download { .. }
        | Error::NotCached { .. }
        | Error::InvalidTensor { .. }
        | Error::NoCacheDir { .. } => "ModelLoadError",
        Error::TokenizerNotFound { .. }
        | Error::TokenizerInvalid { .. }
        | Error::GgufTokenizer { .. }
        | Error::TokenizerMismatch { .. }
        | Error::Tokenization { .. }
        | Error::Template { .. } => "TokenizerError",
        Error::InvalidArgument { .. } => "InvalidArgumentError",
        Error::ContextLength { .. } => "ContextLengthError",
        Error::Generation { .. } | Error::Interrupted => "GenerationError",
        Error::Internal { operation, .. } => match operation {
            Operation::Loading => "ModelLoadError",
            Operation::Tokenizing | Operation::RenderingTemplate => "TokenizerError",
            Operation::Generating => "GenerationError",
        },
    }
}

static ERRORS_MODULE: PyOnceLock<Py<PyModule>> = PyOnceLock::new();

pub(crate) fn exception_class<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyType>> {
    let module =
        ERRORS_MODULE.get_or_try_init(py, || py.import("candle_phi._errors").map(Bound::unbind))?;
    Ok(module.bind(py).getattr(name)?.cast_into::<PyType>()?)
}

pub(crate) fn to_py_err(py: Python<'_>, err: Error) -> PyErr {
    if let Error::Interrupted = err {
        return pyo3::exceptions::PyKeyboardInterrupt::new_err(());
    }
    match exception_class(py, class_name(&err)) {
        Ok(class) => PyErr::from_type(class, err.to_string()),
        Err(import_failure) => import_failure,
    }
}

/// `?` on engine results inside binding code.
pub(crate) trait IntoPyResult<T> {
    fn py_err(self, py: Python<'_>) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for crate::Result<T> {
    fn py_err(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|e| to_py_err(py, e))
    }
}
