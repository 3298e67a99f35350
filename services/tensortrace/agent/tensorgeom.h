/* The interface between agent/_tensorgeom.cpp (built per torch version) and agent/_capture.c (plain C,
 * no torch): one function, handed over as a PyCapsule named TT_GEOMETRY_CAPSULE. */
#ifndef TENSORTRACE_TENSORGEOM_H
#define TENSORTRACE_TENSORGEOM_H

#include <Python.h>
#include <stdint.h>

#define TT_GEOMETRY_ABI 1
#define TT_GEOMETRY_CAPSULE "tensortrace.agent._tensorgeom.geometry.v1"
#define TT_GEOMETRY_MAX_DIMS 10

typedef struct {
    const void *data;          /* first element (storage offset applied) */
    int ndim;
    int elem;                  /* bytes per element */
    PyObject *dtype;           /* torch.dtype, borrowed (torch's own table) */
    int64_t sizes[TT_GEOMETRY_MAX_DIMS];
    int64_t strides[TT_GEOMETRY_MAX_DIMS];   /* in elements */
} TTGeometry;

/* 1: g filled; 0: not a plain dense CPU tensor (take the general path). Never raises. */
typedef int (*TTGeometryFn)(PyObject *obj, TTGeometry *g);

#endif
