/* Kiln Windows GUI test program.
 *
 * Opens a window titled "Kiln GUI test" filled with a known colour
 * (RGB 32,96,192) and the text "Hello from the Kiln GUI test", so a
 * screenshot of the guest display can be checked for it. With
 * "--exit-after MS" it closes itself after MS milliseconds and exits 0, and
 * it writes "painted" to stdout once the window has been drawn. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <windows.h>

#define KILN_TEST_COLOUR RGB(32, 96, 192)
#define KILN_TEST_TEXT "Hello from the Kiln GUI test"
#define EXIT_TIMER 1

static int painted_once;

static LRESULT CALLBACK window_proc(HWND hwnd, UINT msg, WPARAM wp, LPARAM lp)
{
    switch (msg) {
    case WM_PAINT: {
        PAINTSTRUCT ps;
        RECT rc;
        HDC dc = BeginPaint(hwnd, &ps);
        HBRUSH brush = CreateSolidBrush(KILN_TEST_COLOUR);
        GetClientRect(hwnd, &rc);
        FillRect(dc, &rc, brush);
        DeleteObject(brush);
        SetBkMode(dc, TRANSPARENT);
        SetTextColor(dc, RGB(255, 255, 255));
        DrawTextA(dc, KILN_TEST_TEXT, -1, &rc, DT_CENTER | DT_VCENTER | DT_SINGLELINE);
        EndPaint(hwnd, &ps);
        if (!painted_once) {
            painted_once = 1;
            printf("painted\n");
            fflush(stdout);
        }
        return 0;
    }
    case WM_TIMER:
        if (wp == EXIT_TIMER)
            DestroyWindow(hwnd);
        return 0;
    case WM_DESTROY:
        PostQuitMessage(0);
        return 0;
    }
    return DefWindowProcA(hwnd, msg, wp, lp);
}

int WINAPI WinMain(HINSTANCE inst, HINSTANCE prev, LPSTR cmdline, int show)
{
    WNDCLASSA wc = {0};
    HWND hwnd;
    MSG msg;
    UINT exit_after = 0;
    const char *flag = strstr(cmdline, "--exit-after ");

    (void)prev;
    if (flag)
        exit_after = (UINT)strtoul(flag + strlen("--exit-after "), NULL, 10);

    wc.lpfnWndProc = window_proc;
    wc.hInstance = inst;
    wc.lpszClassName = "KilnGuiTest";
    wc.hCursor = LoadCursor(NULL, IDC_ARROW);
    if (!RegisterClassA(&wc))
        return 2;
    hwnd = CreateWindowA("KilnGuiTest", "Kiln GUI test", WS_OVERLAPPEDWINDOW | WS_VISIBLE,
                         40, 40, 480, 240, NULL, NULL, inst, NULL);
    if (!hwnd)
        return 3;
    ShowWindow(hwnd, show);
    UpdateWindow(hwnd);
    if (exit_after)
        SetTimer(hwnd, EXIT_TIMER, exit_after, NULL);
    while (GetMessageA(&msg, NULL, 0, 0) > 0) {
        TranslateMessage(&msg);
        DispatchMessageA(&msg);
    }
    return 0;
}
