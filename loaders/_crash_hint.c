/* Print a line of advice when the process crashes in native code (a segmentation fault in DALI, say).

Python's faulthandler prints where a crash was (the Python stack) but cannot say what to do
about it, and a Python signal handler cannot run on a segmentation fault. This installs a
C handler for the fatal signals that writes the message given to arm() to stderr, then
hands the signal on to the handler that was there before (faulthandler's, which prints the
stack and ends the process as the signal would).

    arm(message: bytes)    install (once) and set the message; disarm() clears it
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <signal.h>
#include <string.h>
#include <unistd.h>

static const int SIGNALS[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT};
#define COUNT (sizeof(SIGNALS) / sizeof(SIGNALS[0]))
static struct sigaction previous[COUNT];
static char message[4096];
static volatile sig_atomic_t length = 0;
static int installed = 0;

static void on_fatal(int signum) {
    if (length > 0) {
        ssize_t ignored = write(STDERR_FILENO, message, (size_t)length);  /* async-signal-safe */
        (void)ignored;
        length = 0;
    }
    for (size_t i = 0; i < COUNT; i++) {
        if (SIGNALS[i] == signum) {
            sigaction(signum, &previous[i], NULL);  /* the handler before ours (faulthandler's, or the default) */
            break;
        }
    }
    raise(signum);  /* delivered at once (SA_NODEFER): the previous handler runs, then the process ends */
}

static PyObject *arm(PyObject *self, PyObject *args) {
    Py_buffer text;
    if (!PyArg_ParseTuple(args, "y*", &text))
        return NULL;
    size_t n = (size_t)text.len < sizeof(message) ? (size_t)text.len : sizeof(message);
    length = 0;
    memcpy(message, text.buf, n);
    length = (sig_atomic_t)n;
    PyBuffer_Release(&text);
    if (!installed) {
        struct sigaction action;
        memset(&action, 0, sizeof(action));
        action.sa_handler = on_fatal;
        action.sa_flags = SA_NODEFER;
        sigemptyset(&action.sa_mask);
        for (size_t i = 0; i < COUNT; i++)
            sigaction(SIGNALS[i], &action, &previous[i]);
        installed = 1;
    }
    Py_RETURN_NONE;
}

static PyObject *disarm(PyObject *self, PyObject *args) {
    length = 0;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"arm", arm, METH_VARARGS, "arm(message: bytes): print message on stderr if the process crashes"},
    {"disarm", disarm, METH_NOARGS, "disarm(): print nothing more on a crash"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_crash_hint", NULL, -1, methods};

PyMODINIT_FUNC PyInit__crash_hint(void) { return PyModule_Create(&module); }
