/* Decode one rectangle of a JPEG with libjpeg-turbo, skipping the work outside it.

A training crop covers 40-70% of a packed frame. libjpeg-turbo can decode just those
columns (jpeg_crop_scanline) and those rows (jpeg_skip_scanlines above, stopping below),
which saves the inverse DCT, upsampling and colour conversion of the rest; DALI's CPU
decoder does the same for its random crops. simplejpeg and OpenCV decode whole images.

    decode_region(jpeg, scale_num, top, left, height, width, fast, out) -> (x, w)

The image is decoded at scale scale_num/8 (libjpeg's DCT scaling); the rectangle is in
the coordinates of the scaled image. libjpeg widens it to whole MCU columns: out (a
writable buffer, reused by the caller) receives height rows of w RGB pixels starting at
column x <= left, with x + w >= left + width; it must hold height * (width + 32) * 3 bytes.
A corrupt JPEG raises ValueError; libjpeg's warnings (premature end of data, ...) count
as errors too, so a broken frame is never returned as a grey one.
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdio.h>

#include <jpeglib.h>

#if !defined(LIBJPEG_TURBO_VERSION_NUMBER) || LIBJPEG_TURBO_VERSION_NUMBER < 1005000
#error "libjpeg-turbo >= 1.5 is needed (jpeg_crop_scanline, jpeg_skip_scanlines)"
#endif

struct error_manager {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
};

static void raise_error(j_common_ptr cinfo) {
    struct error_manager *err = (struct error_manager *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
}

static void on_message(j_common_ptr cinfo, int level) {
    if (level < 0)  /* a warning: corrupt data that libjpeg would paper over */
        raise_error(cinfo);
}

static PyObject *decode_region(PyObject *self, PyObject *args) {
    Py_buffer jpeg, out;
    int scale_num, top, left, height, width, fast;
    if (!PyArg_ParseTuple(args, "y*iiiiipw*", &jpeg, &scale_num, &top, &left, &height, &width, &fast, &out))
        return NULL;
    if (scale_num < 1 || scale_num > 16) {
        PyBuffer_Release(&jpeg);
        PyBuffer_Release(&out);
        return PyErr_Format(PyExc_ValueError, "scale_num must be 1..16 (a scale of n/8), not %d", scale_num);
    }

    struct jpeg_decompress_struct cinfo;
    struct error_manager err;
    JSAMPROW *volatile rows = NULL;  /* volatile: set after setjmp, read after longjmp */
    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = raise_error;
    err.pub.emit_message = on_message;
    if (setjmp(err.jump)) {
        jpeg_destroy_decompress(&cinfo);
        PyMem_Free(rows);
        PyBuffer_Release(&jpeg);
        PyBuffer_Release(&out);
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_ValueError, "corrupt JPEG: %s", err.message);
        return NULL;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, jpeg.buf, (unsigned long)jpeg.len);
    jpeg_read_header(&cinfo, TRUE);
    cinfo.out_color_space = JCS_RGB;
    cinfo.scale_num = (unsigned int)scale_num;
    cinfo.scale_denom = 8;
    if (fast) {  /* as simplejpeg's fastdct and fastupsample */
        cinfo.dct_method = JDCT_IFAST;
        cinfo.do_fancy_upsampling = FALSE;
    }
    jpeg_start_decompress(&cinfo);
    if (top < 0 || left < 0 || height < 1 || width < 1 ||
        (JDIMENSION)(top + height) > cinfo.output_height || (JDIMENSION)(left + width) > cinfo.output_width) {
        PyErr_Format(PyExc_ValueError, "region %dx%d at (%d, %d) outside the %ux%u image (scale %d/8)",
                     width, height, left, top, cinfo.output_width, cinfo.output_height, scale_num);
        longjmp(err.jump, 1);
    }
    JDIMENSION x = (JDIMENSION)left, w = (JDIMENSION)width;
    jpeg_crop_scanline(&cinfo, &x, &w);
    Py_ssize_t stride = (Py_ssize_t)w * 3;
    if (out.len < stride * height) {
        PyErr_Format(PyExc_ValueError, "out holds %zd bytes, the region needs %zd", out.len, stride * height);
        longjmp(err.jump, 1);
    }
    rows = PyMem_Malloc(sizeof(JSAMPROW) * (size_t)height);
    if (rows == NULL) {
        PyErr_NoMemory();
        longjmp(err.jump, 1);
    }
    for (int i = 0; i < height; i++)
        rows[i] = (JSAMPROW)((char *)out.buf + i * stride);
    if (top > 0)
        jpeg_skip_scanlines(&cinfo, (JDIMENSION)top);
    while (cinfo.output_scanline < (JDIMENSION)(top + height))
        jpeg_read_scanlines(&cinfo, rows + (cinfo.output_scanline - top), (JDIMENSION)(top + height) - cinfo.output_scanline);
    jpeg_abort_decompress(&cinfo);  /* the rows below are not needed: no need to decode them */
    jpeg_destroy_decompress(&cinfo);
    PyMem_Free(rows);
    PyBuffer_Release(&jpeg);
    PyBuffer_Release(&out);
    return Py_BuildValue("(ii)", (int)x, (int)w);
}

static PyMethodDef methods[] = {
    {"decode_region", decode_region, METH_VARARGS,
     "decode_region(jpeg, scale_num, top, left, height, width, fast, out) -> (x, w); RGB rows in out"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpeg_region", NULL, -1, methods};

PyMODINIT_FUNC PyInit__jpeg_region(void) { return PyModule_Create(&module); }
